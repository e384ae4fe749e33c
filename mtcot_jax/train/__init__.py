"""Training: losses, optimizer, sharded step, checkpoints, evaluation, the loop."""
