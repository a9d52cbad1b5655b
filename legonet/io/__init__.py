"""Reading checkpoints and writing files safely."""
