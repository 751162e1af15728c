"""Rotary position embeddings (RoPE) as meliad computes them (`position.rotate_kq`).

Each head vector is split into halves x = v[:D/2], y = v[D/2:], and pair t is rotated by the angle
π·p/λ_t of its position p (λ_t = max_wavelength^(t/(D/2)), max_wavelength 10 000 in meliad):

    x' = x·cos − y·sin,   y' = x·sin + y·cos

Queries sit at positions 0 … Q−1 and keys at −offset … K−1−offset, so q'_i·k'_j depends on the
relative position j − (i + offset) only. No weights.
"""

from __future__ import annotations

import functools

import numpy as np
from keras import ops

from meliad_core.extend import PositionStrategy
from meliad_positions.sinusoids import cos_sin


@functools.lru_cache(maxsize=64)
def rotation_tables(start: int, count: int, dim: int, max_wavelength: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin shaped (count, 1, dim/2) to broadcast over (…, count, heads, dim/2); read-only, cached."""
    cos, sin = cos_sin(start, count, dim, max_wavelength)
    cos, sin = cos[:, None, :], sin[:, None, :]
    cos.flags.writeable = False
    sin.flags.writeable = False
    return cos, sin


def rotate(x, start: int, max_wavelength: float):
    """x (…, N, H, D) with vector n rotated to position start + n, in x's dtype (as meliad: the keys' dtype)."""
    count, dim = x.shape[-3], x.shape[-1]
    cos, sin = rotation_tables(int(start), int(count), int(dim), float(max_wavelength))
    cos, sin = ops.cast(cos, x.dtype), ops.cast(sin, x.dtype)
    half = dim // 2
    x1, x2 = x[..., :half], x[..., half:]
    return ops.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class RotaryPositions(PositionStrategy):
    """transform(q, k, offset): rotate queries from position 0 and keys from position −offset."""

    def __init__(self, max_wavelength: float = 10_000.0, **kwargs):
        super().__init__(**kwargs)
        self.max_wavelength = float(max_wavelength)

    def transform(self, queries, keys, offset: int | None = None):
        if queries.shape[-1] % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {queries.shape[-1]}")
        if offset is None:
            offset = keys.shape[-3] - queries.shape[-3]
        return rotate(queries, 0, self.max_wavelength), rotate(keys, -offset, self.max_wavelength)

    def get_config(self):
        return {**super().get_config(), "max_wavelength": self.max_wavelength}
