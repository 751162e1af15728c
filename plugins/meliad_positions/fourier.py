"""Fourier relative position bias as meliad computes it (`position_fourier.RelativeFourierPositions`).

Key j gets the position vector [cos(π·j/λ_t), sin(π·j/λ_t)]_t and query i the one of position i + offset
(P = position_vector_size entries, P/2 half-wavelengths λ_t = max_wavelength^(t/(P/2)); meliad's layer
uses max_wavelength = 2·window). A learned (H, P) matrix [a | b] rotates and scales each (cos, sin)
pair of the query position, x' = a·x − b·y, y' = b·x + a·y, and the bias is the dot product with the
key position:

    bias[h, i, j] = Σ_t a[h,t]·cos(π·r/λ_t) + b[h,t]·sin(π·r/λ_t),   r = j − (i + offset)

a starts at 2/P and b at 0, so at init the bias is (2/P)·Σ_t cos(π·r/λ_t), 1 at r = 0.
"""

from __future__ import annotations

import functools

import numpy as np
from keras import ops

from meliad_core.extend import PositionStrategy
from meliad_positions.sinusoids import position_vectors


@functools.lru_cache(maxsize=64)
def fourier_tables(num_queries: int, num_keys: int, offset: int, size: int, max_wavelength: float):
    """(key vectors (K, P), [qx, qx] (Q, P), [qy, qy] (Q, P)), float32, read-only, cached per geometry."""
    keys = position_vectors(0, num_keys, size, max_wavelength)
    queries = position_vectors(offset, num_queries, size, max_wavelength)
    qx, qy = np.split(queries, 2, axis=-1)
    tables = (keys, np.concatenate([qx, qx], axis=-1), np.concatenate([qy, qy], axis=-1))
    for table in tables:
        table.flags.writeable = False
    return tables


def initial_rotation(num_heads: int, size: int):
    """meliad's init: a = 2/P (identity times 1/number of waves), b = 0."""

    def initializer(shape, dtype=None):
        half = (num_heads, size // 2)
        return ops.concatenate([ops.full(half, 2.0 / size, dtype=dtype), ops.zeros(half, dtype=dtype)], axis=1)

    return initializer


class FourierRelativeBias(PositionStrategy):
    """compute_bias(Q, K, offset) -> (H, Q, K); one learned (H, P) `rotation_matrix` per layer."""

    def __init__(self, num_heads: int, position_vector_size: int = 128, max_wavelength: float = 1024.0, **kwargs):
        super().__init__(**kwargs)
        if position_vector_size % 2:
            raise ValueError(f"position_vector_size must be even, got {position_vector_size}")
        self.num_heads = num_heads
        self.position_vector_size = position_vector_size
        self.max_wavelength = float(max_wavelength)

    def build(self, input_shape=None):
        self.rotation_matrix = self.add_weight(
            shape=(self.num_heads, self.position_vector_size),
            initializer=initial_rotation(self.num_heads, self.position_vector_size),
            name="rotation_matrix",
        )
        self.built = True

    def compute_bias(self, num_queries: int, num_keys: int, offset: int | None = None):
        if offset is None:
            offset = num_keys - num_queries
        keys, qxs, qys = fourier_tables(int(num_queries), int(num_keys), int(offset),
                                        self.position_vector_size, self.max_wavelength)
        dtype = self.rotation_matrix.dtype
        rmat = ops.convert_to_tensor(self.rotation_matrix)
        half = self.position_vector_size // 2
        a, b = rmat[:, :half], rmat[:, half:]
        rmat1 = rmat[:, None, :]                                     # [a | b]
        rmat2 = ops.concatenate([-b, a], axis=-1)[:, None, :]        # [−b | a]
        rotated = rmat1 * ops.cast(qxs, dtype)[None] + rmat2 * ops.cast(qys, dtype)[None]  # (H, Q, P)
        return ops.einsum("hqd,kd->hqk", rotated, ops.cast(keys, dtype))

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads,
                "position_vector_size": self.position_vector_size, "max_wavelength": self.max_wavelength}
