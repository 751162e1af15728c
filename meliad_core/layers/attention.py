"""The attention core shared by all three models (spec §3) and the attention-kernel interface.

`reference_attend` is the portable path: core registers it as the `reference` kernel, and every
fast kernel is tested against it.

Shapes: attention runs over G blocks at once. q is (B, G, Q, H, D); k and v are (B, G, K, H, D).
A sliding window puts each window in its own block (G = N/W, K = 2W); the recurrent cell uses one
block per recurrent step.
"""

from __future__ import annotations

import functools
from typing import Protocol

import numpy as np
from keras import ops

MASK_VALUE = -1e6  # meliad's value for masked logits
SAFE_SOFTMAX_MIN = -1000.0


def relative_positions(num_queries: int, num_keys: int, offset: int | None = None) -> np.ndarray:
    """rel[i, j] = j − (i + offset); offset defaults to K − Q, lining up the last queries with the last keys."""
    if offset is None:
        offset = num_keys - num_queries
    return np.arange(num_keys, dtype=np.int32)[None, :] - (np.arange(num_queries, dtype=np.int32)[:, None] + offset)


@functools.lru_cache(maxsize=64)
def window_mask(num_queries: int, num_keys: int, window: int, offset: int | None = None) -> np.ndarray:
    """meliad's causal mask: each query sees exactly the `window` keys before it, never itself (spec §3.3).

    Cached (eager backends would rebuild it every step); the array is read-only.
    """
    rel = relative_positions(num_queries, num_keys, offset)
    mask = (rel < 0) & (rel >= -window)
    mask.flags.writeable = False
    return mask


def safe_softmax(x, axis: int = -1, min_x: float = SAFE_SOFTMAX_MIN):
    """Softmax whose fully masked rows come out as zeros ("attend to nothing"), as in meliad."""
    m = ops.stop_gradient(ops.maximum(ops.max(x, axis=axis, keepdims=True), min_x))
    e = ops.exp(x - m)
    return e / (ops.sum(e, axis=axis, keepdims=True) + ops.exp(min_x - m))


def reference_attend(q, k, v, *, bias=None, mask=None, scale=None, dropout_mask=None):
    """Plain-einsum attention: softmax_j(((q·k) + bias)·scale, masked) · v.

    q: (B, G, Q, H, D); k, v: (B, G, K, H, D); bias: (H, Q, K) or None; mask: (Q, K) bool or None;
    scale: (H,) or None; dropout_mask: (H, Q, K) multiplier or None. Returns (B, G, Q, H, D).
    The bias is added before the learned scale multiplies, exactly as meliad does (spec §3.2).
    """
    logits = ops.einsum("bgqhd,bgkhd->bghqk", q, k)
    if bias is not None:
        logits = logits + ops.cast(bias, logits.dtype)
    if scale is not None:
        logits = logits * ops.cast(ops.reshape(scale, (-1, 1, 1)), logits.dtype)
    if mask is not None:
        logits = ops.where(mask, logits, ops.cast(MASK_VALUE, logits.dtype))
    probs = safe_softmax(logits, axis=-1)
    if dropout_mask is not None:
        probs = probs * ops.cast(dropout_mask, probs.dtype)
    return ops.einsum("bghqk,bgkhd->bgqhd", probs, v)


class AttentionKernel(Protocol):
    """What an `attention_kernel` plugin registers: the same contract as `reference_attend`."""

    def attend(self, q, k, v, *, bias=None, mask=None, scale=None, dropout_mask=None): ...


class ReferenceKernel:
    """`reference`: meliad's attention computed with einsums, on every backend."""

    name = "reference"

    def attend(self, q, k, v, *, bias=None, mask=None, scale=None, dropout_mask=None):
        return reference_attend(q, k, v, bias=bias, mask=mask, scale=scale, dropout_mask=dropout_mask)
