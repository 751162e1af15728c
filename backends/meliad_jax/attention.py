"""meliad's attention on `jax.nn.dot_product_attention`.

The fused op computes softmax(q·kᵀ·s + bias, masked)·v with one scalar scale s. meliad computes
softmax_safe(((q·k) + bias)·scale_h) with a per-head scale and masked logits −1e6 (spec §3.2). They
agree when fed
  - queries multiplied by the per-head scale, the op's own scale set to 1,
  - the bias multiplied by the per-head scale (the bias is added before the scale in meliad),
  - and fully masked rows zeroed afterwards (meliad's safe softmax returns 0 there; the op a uniform row).
Away from fully masked rows meliad's safe softmax equals a plain softmax (its extra exp(−1000 − max)
term vanishes in float32). With an attention-dropout mask the reference path runs instead: the op
takes no (H, Q, K) probability multiplier, and meliad's dropout pattern is kept.
G blocks fold into the batch: q (B, G, Q, H, D) is already the op's (batch, seq, heads, dim) layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meliad_core.extend import reference_attend


class JaxDotProductAttention:
    name = "jax_dpa"

    def __init__(self, implementation: str | None = None):
        self.implementation = implementation  # None: cuDNN where it applies, else XLA

    def attend(self, q, k, v, *, bias=None, mask=None, scale=None, dropout_mask=None):
        if dropout_mask is not None:
            return reference_attend(q, k, v, bias=bias, mask=mask, scale=scale, dropout_mask=dropout_mask)
        q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
        b, g, nq, h, d = q.shape
        nk = k.shape[2]
        qf, kf, vf = q.reshape(b * g, nq, h, d), k.reshape(b * g, nk, h, d), v.reshape(b * g, nk, h, d)
        if scale is not None:
            s = jnp.asarray(scale).astype(q.dtype).reshape(h)
            qf = qf * s[None, None, :, None]
        bias4 = None
        if bias is not None:
            bias4 = jnp.asarray(bias).astype(q.dtype).reshape(1, h, nq, nk)
            if scale is not None:
                bias4 = bias4 * s[None, :, None, None]
        mask4, row_has_keys = None, None
        if mask is not None:
            m = jnp.asarray(mask).astype(bool).reshape(nq, nk)
            mask4 = m[None, None]
            row_has_keys = jnp.any(m, axis=-1).astype(q.dtype)  # (Q,)
        y = jax.nn.dot_product_attention(qf, kf, vf, bias=bias4, mask=mask4, scale=1.0,
                                         implementation=self.implementation)
        if row_has_keys is not None:
            y = y * row_has_keys[None, :, None, None]
        return y.reshape(b, g, nq, h, d)

