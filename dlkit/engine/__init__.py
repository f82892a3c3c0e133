"""Training and evaluation loops over in-memory tensors."""
