"""meliad's attention on torch's fused scaled_dot_product_attention.

SDPA computes softmax(q·kᵀ·s + additive_mask)·v. meliad computes softmax_safe(((q·k) + bias)·scale_h),
with masked logits set to −1e6 (spec §3.2). They agree when fed
  - queries multiplied by the learned per-head scale, SDPA's own scale set to 1,
  - an additive mask holding bias·scale_h where allowed and a large negative number elsewhere,
  - and fully masked rows zeroed afterwards (meliad's safe softmax returns 0 there; SDPA a uniform row).
With an attention-dropout mask (training with attn_dropout > 0) the reference path runs instead, so
that the dropout pattern stays meliad's (one (H, Q, K) mask shared over batch and windows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from keras import ops

from meliad_core.extend import reference_attend

_MASKED = -1e9


class TorchSDPAKernel:
    name = "torch_sdpa"

    def attend(self, q, k, v, *, bias=None, mask=None, scale=None, dropout_mask=None):
        if dropout_mask is not None:
            return reference_attend(q, k, v, bias=bias, mask=mask, scale=scale, dropout_mask=dropout_mask)
        q, k, v = (ops.convert_to_tensor(t) for t in (q, k, v))
        b, g, nq, h, d = q.shape
        nk = k.shape[2]
        qf = q.reshape(b * g, nq, h, d).transpose(1, 2)  # (BG, H, Q, D)
        kf = k.reshape(b * g, nk, h, d).transpose(1, 2)
        vf = v.reshape(b * g, nk, h, d).transpose(1, 2)
        scale_t = None
        if scale is not None:
            scale_t = ops.convert_to_tensor(scale).to(q.dtype).reshape(1, h, 1, 1)
            qf = qf * scale_t
        additive = None
        if bias is not None:
            additive = ops.convert_to_tensor(bias).to(q.dtype).reshape(1, h, nq, nk)
            if scale_t is not None:
                additive = additive * scale_t
        row_has_keys = None
        if mask is not None:
            mask_t = ops.convert_to_tensor(mask).to(torch.bool).reshape(1, 1, nq, nk)
            masked = torch.full((), _MASKED, dtype=q.dtype, device=q.device)
            base = additive if additive is not None else torch.zeros((1, 1, nq, nk), dtype=q.dtype, device=q.device)
            additive = torch.where(mask_t, base, masked)
            row_has_keys = mask_t.any(dim=-1, keepdim=True).to(q.dtype)  # (1, 1, Q, 1)
        if additive is not None:
            additive = additive.expand(b * g, h, nq, nk)
        y = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=additive, scale=1.0)
        if row_has_keys is not None:
            y = y * row_has_keys
        return y.transpose(1, 2).reshape(b, g, nq, h, d)
