"""What people read: reports from MLflow, and feature visualisations."""
