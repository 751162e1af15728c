"""Small pieces shared by every layer: RMSNorm, initialisers, tiled dropout, head reshapes."""

from __future__ import annotations

import keras
from keras import ops


def kernel_init(scale: float = 1.0) -> keras.initializers.Initializer:
    """meliad's Dense init: truncated normal with variance scale/fan_in (spec §3.1)."""
    return keras.initializers.VarianceScaling(scale, "fan_in", "truncated_normal")


class RMSNorm(keras.layers.Layer):
    """meliad's LayerNorm(use_mean=False, use_bias=False): y = x·rsqrt(mean(x²)+1e-6)·γ (spec §5.1)."""

    def __init__(self, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")

    def call(self, x):
        x32 = ops.cast(x, "float32")
        y = x32 * ops.rsqrt(ops.mean(ops.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return ops.cast(y, self.compute_dtype) * ops.cast(self.scale, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def tiled_dropout(x, rate: float, seed, training: bool, tile: int = 128):
    """Dropout with one (1, tile, E) mask repeated along time and shared across the batch (spec §5.4).

    For segments shorter than the tile the mask is trimmed, as meliad's later code does.
    """
    if not training or rate <= 0.0:
        return x
    length, width = x.shape[-2], x.shape[-1]
    size = min(tile, length)
    keep = 1.0 - rate
    mask = ops.cast(keras.random.uniform((1, size, width), seed=seed) < keep, x.dtype) / keep
    repeats = -(-length // size)
    if repeats > 1:
        mask = ops.tile(mask, (1, repeats, 1))[:, :length]
    return x * mask


def split_heads(x, num_heads: int, head_dim: int):
    """(..., T, H·D) -> (..., T, H, D); head h is columns [h·D, (h+1)·D) as in meliad."""
    return ops.reshape(x, (-1,) + tuple(x.shape[1:-1]) + (num_heads, head_dim))


def merge_heads(x):
    """(B, T, H, D) -> (B, T, H·D)."""
    return ops.reshape(x, (-1, x.shape[1], x.shape[2] * x.shape[3]))


def l2_normalize(x, epsilon: float = 1e-6):
    """k·rsqrt(Σk² + eps) per head vector; the epsilon is inside the sum (spec §3.1)."""
    return x * ops.rsqrt(ops.sum(ops.square(x), axis=-1, keepdims=True) + epsilon)
