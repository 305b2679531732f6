"""Experiment configs (benchmark matrices and search spaces), shipped with the package."""
