"""meliad's sin/cos position vectors (spec §2.4), in numpy, shared by the rotary and Fourier strategies.

meliad (`position.position_encoding`) multiplies positions by π: angle = π·k / λ_t with half-wavelengths
λ_t = max_wavelength^(t / (d/2)), t = 0 … d/2 − 1, so λ runs from 1 up to (nearly) max_wavelength. The cos
values fill the first half of the vector and the sin values the second half (not interleaved). Everything
is float32, as meliad computes it, so the tables match its numbers to the last bit.
"""

from __future__ import annotations

import numpy as np


def half_wavelengths(dim: int, max_wavelength: float) -> np.ndarray:
    """(dim/2,) float32: max_wavelength ** (t / (dim/2)) for t = 0 … dim/2 − 1."""
    if dim % 2:
        raise ValueError(f"sin/cos position vectors need an even size, got {dim}")
    if not max_wavelength > 1:
        raise ValueError(f"max_wavelength must be > 1, got {max_wavelength}")
    half = dim // 2
    exponents = np.arange(half, dtype=np.float32) / np.float32(half)
    return np.power(np.float32(max_wavelength), exponents).astype(np.float32)


def cos_sin(start: int, count: int, dim: int, max_wavelength: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of π·k/λ for positions k = start … start + count − 1: two (count, dim/2) float32 arrays."""
    wavelengths = half_wavelengths(dim, max_wavelength)[None, :]
    k = np.arange(start, start + count, dtype=np.float32)[:, None]
    angles = (np.float32(np.pi) * k) / wavelengths
    return np.cos(angles, dtype=np.float32), np.sin(angles, dtype=np.float32)


def position_vectors(start: int, count: int, dim: int, max_wavelength: float) -> np.ndarray:
    """(count, dim) float32: concat(cos, sin) for positions start … start + count − 1."""
    cos, sin = cos_sin(start, count, dim, max_wavelength)
    return np.concatenate([cos, sin], axis=1)
