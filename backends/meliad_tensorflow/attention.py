"""meliad's attention as one XLA-compiled TensorFlow function.

The computation is the reference's, rearranged so that XLA fuses it into few kernels:
  - ((q·k) + bias)·scale_h = (q·scale_h)·k + bias·scale_h: the per-head scale multiplies the queries
    (B·G·Q·H·D numbers) instead of the logits, and the bias is scaled once;
  - masked logits are set to meliad's −1e6 after the scale, and meliad's safe softmax (a fully masked
    row attends to nothing) is the reference's own function;
  - the attention-dropout mask, when given, is the layer's own (H, Q, K) multiplier, so training
    with attn_dropout draws exactly the reference's pattern.
Blocks G fold into the batch, heads move before queries, and the two products are batched matmuls.
Its gradients are XLA's derivative of the same function (tf.function differentiates through it).
"""

from __future__ import annotations

import tensorflow as tf

from meliad_core.extend import MASK_VALUE, safe_softmax


def _attend(q, k, v, bias, mask, scale, dropout_mask):
    b, g, nq, h, d = q.shape
    nk = k.shape[2]
    qf = tf.transpose(tf.reshape(q, (b * g, nq, h, d)), (0, 2, 1, 3))  # (BG, H, Q, D)
    kf = tf.transpose(tf.reshape(k, (b * g, nk, h, d)), (0, 2, 1, 3))
    vf = tf.transpose(tf.reshape(v, (b * g, nk, h, d)), (0, 2, 1, 3))
    if scale is not None:
        s = tf.reshape(tf.cast(scale, q.dtype), (1, h, 1, 1))
        qf = qf * s
    logits = tf.matmul(qf, kf, transpose_b=True)  # (BG, H, Q, K)
    if bias is not None:
        bias = tf.cast(bias, q.dtype)[None]
        logits = logits + (bias * s if scale is not None else bias)
    if mask is not None:
        logits = tf.where(tf.cast(mask, tf.bool)[None, None], logits, tf.constant(MASK_VALUE, logits.dtype))
    probs = safe_softmax(logits, axis=-1)
    if dropout_mask is not None:
        probs = probs * tf.cast(dropout_mask, probs.dtype)[None]
    y = tf.matmul(probs, vf)  # (BG, H, Q, D)
    return tf.reshape(tf.transpose(y, (0, 2, 1, 3)), (b, g, nq, h, d))


_attend_xla = tf.function(_attend, jit_compile=True)


class TFXLAAttention:
    name = "tf_xla"

    def __init__(self, jit: bool = True):
        self._fn = _attend_xla if jit else _attend  # jit=False: the same ops, fused by nothing (measurement)

    def attend(self, q, k, v, *, bias=None, mask=None, scale=None, dropout_mask=None):
        return self._fn(tf.convert_to_tensor(q), tf.convert_to_tensor(k), tf.convert_to_tensor(v),
                        None if bias is None else tf.convert_to_tensor(bias),
                        None if mask is None else tf.convert_to_tensor(mask),
                        None if scale is None else tf.convert_to_tensor(scale),
                        None if dropout_mask is None else tf.convert_to_tensor(dropout_mask))
