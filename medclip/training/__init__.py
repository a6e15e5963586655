"""Training: losses, optimizer, the data-parallel step, checkpoints and the training loop."""
