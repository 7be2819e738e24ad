"""Training: building the module a config describes, the SVI loop, checkpoints, resume, signals, DDP."""
