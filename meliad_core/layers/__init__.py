"""Keras 3 layers of the three meliad architectures, written once with keras.ops."""
