"""Training: one run top to bottom (fit), its state and epoch (engine), checkpoints, data."""
