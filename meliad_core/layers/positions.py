"""Position information: the interface of position plugins, and meliad's absolute sinusoids.

A position plugin registers a factory `make_position(*, num_heads, head_dim, window, options, name)`
returning a `PositionStrategy` (a Keras layer) or None for "no position information". The windowed
attention asks it, once per call, for an additive bias and lets it transform queries and keys:

    logits = ((transform(q) · transform(k)) + bias) · scale     (the bias before the scale, as meliad)
"""

from __future__ import annotations

import keras
import numpy as np


class PositionStrategy(keras.layers.Layer):
    """Base class of position plugins; override one or both methods.

    Geometry: queries are (B, G, Q, H, D) and keys (B, G, K, H, D) in G blocks (windows); query i of
    a block sits at position i + offset among the block's keys (offset = K − Q with the XL cache,
    0 without), so the relative position of key j to query i is j − (i + offset).
    """

    def compute_bias(self, num_queries: int, num_keys: int, offset: int):
        """An additive (H, Q, K) bias, or None."""
        return None

    def transform(self, queries, keys, offset: int):
        """(queries, keys) with position information applied (rotary, say); by default unchanged."""
        return queries, keys


def absolute_position_embeddings(length: int, width: int) -> np.ndarray:
    """meliad's sinusoids for positions 0..length−1 of a segment: angle π·k/wavelength with
    wavelengths 10000^t, t evenly spaced in [0, 1); the cosine block first, then the sine block."""
    half = width // 2
    wavelengths = 10000.0 ** (np.arange(half, dtype=np.float64) / half)
    angles = np.pi * np.arange(length, dtype=np.float64)[:, None] / wavelengths[None, :]
    embeddings = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    if width % 2:
        embeddings = np.pad(embeddings, ((0, 0), (0, 1)))
    return embeddings.astype("float32")
