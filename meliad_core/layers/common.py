"""Small pieces shared by every layer: the norm, dense weights, activations, tiled dropout, head reshapes."""

from __future__ import annotations

import keras
from keras import ops

ACTIVATIONS = {
    "relu": ops.relu,
    "gelu": lambda x: ops.gelu(x, approximate=False),  # the exact (erf) form
    "swish": lambda x: x * ops.sigmoid(x),  # meliad's swish (no learned beta)
    "tanh": ops.tanh,
    "sigmoid": ops.sigmoid,
}


def kernel_init(scale: float = 1.0) -> keras.initializers.Initializer:
    """meliad's Dense init: truncated normal with variance scale/fan_in (spec §3.1)."""
    return keras.initializers.VarianceScaling(scale, "fan_in", "truncated_normal")


@keras.saving.register_keras_serializable(package="meliad")
class LayerNorm(keras.layers.Layer):
    """meliad's LayerNorm: by default use_mean=False, use_bias=False, i.e. an RMSNorm (spec §5.1):
    y = x·rsqrt(mean(x²)+1e-6)·γ. With use_mean the mean is removed first; with use_bias β is added.
    Statistics in float32, output in the compute dtype."""

    def __init__(self, epsilon: float = 1e-6, use_mean: bool = False, use_bias: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.epsilon, self.use_mean, self.use_bias = epsilon, use_mean, use_bias

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="bias")

    def call(self, x):
        x32 = ops.cast(x, "float32")
        if self.use_mean:
            x32 = x32 - ops.mean(x32, axis=-1, keepdims=True)
        y = x32 * ops.rsqrt(ops.mean(ops.square(x32), axis=-1, keepdims=True) + self.epsilon)
        y = ops.cast(y, self.compute_dtype) * ops.cast(self.scale, self.compute_dtype)
        if self.bias is not None:
            y = y + ops.cast(self.bias, self.compute_dtype)
        return y

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "use_mean": self.use_mean, "use_bias": self.use_bias}


RMSNorm = LayerNorm  # meliad's default configuration of it


def add_dense(layer: keras.layers.Layer, fan_in: int, fan_out: int, name: str, use_bias: bool = False):
    """A (fan_in, fan_out) kernel named `name` (and a zero bias `name`_bias) on `layer`; returns (w, b or None)."""
    w = layer.add_weight(shape=(fan_in, fan_out), initializer=kernel_init(), name=name)
    b = layer.add_weight(shape=(fan_out,), initializer="zeros", name=f"{name}_bias") if use_bias else None
    return w, b


def dense(x, w, b=None):
    y = ops.matmul(x, w)
    return y if b is None else y + b


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
