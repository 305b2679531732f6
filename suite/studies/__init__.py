"""Studies of many runs: benchmark matrices and Optuna searches."""
