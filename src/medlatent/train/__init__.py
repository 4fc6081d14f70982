"""Training: optimiser and schedule, precision, checkpoints, run folders, the step loop."""
