"""Backends: PyTorch and Keras 3, imported lazily by name."""
