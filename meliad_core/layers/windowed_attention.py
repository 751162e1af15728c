"""Windowed attention with the Transformer-XL cache (spec §4): meliad's local attention.

A segment of N tokens is cut into G = N/W windows. Window g's queries attend to the keys of window
g−1 and g (2W keys; for g = 0 the cached last window of the previous segment), through the causal
mask that excludes the token itself. All windows run at once in a blocked (B, G, 2W, H, D) layout.
The cache is zeroed (not masked) for rows that start a document, as meliad does. Without the XL
cache the window is the whole segment and nothing is carried.

State: {"keys", "values"}, each (B, W, H, D), the last window of the segment.
"""

from __future__ import annotations

import keras
from keras import ops

from meliad_core import assemble
from meliad_core.layers.attention import window_mask


@keras.saving.register_keras_serializable(package="meliad")
class WindowedAttention(keras.layers.Layer):
    def __init__(self, *, num_heads: int, head_dim: int, window: int, xl_cache: bool = True, kernel: str = "auto",
                 kernel_options: dict | None = None, position: str = "t5", position_options: dict | None = None,
                 use_causal_mask: bool = True, attn_dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads, self.head_dim, self.window, self.xl_cache = num_heads, head_dim, window, xl_cache
        self.kernel_name, self.kernel_options = kernel, dict(kernel_options or {})
        self.position_name, self.position_options = position, dict(position_options or {})
        self.use_causal_mask, self.attn_dropout = use_causal_mask, attn_dropout
        self.kernel = assemble.attention_kernel(kernel, self.kernel_options)
        self.position = assemble.position_strategy(position, self.position_options, num_heads=num_heads,
                                                   head_dim=head_dim, window=window)

    def build(self, input_shape=None):
        if self.position is not None:
            self.position.build(None)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "head_dim": self.head_dim,
                "window": self.window, "xl_cache": self.xl_cache, "kernel": self.kernel_name,
                "kernel_options": self.kernel_options, "position": self.position_name,
                "position_options": self.position_options, "use_causal_mask": self.use_causal_mask,
                "attn_dropout": self.attn_dropout}

    def state_spec(self, batch_size: int, dtype: str = "float32") -> dict[str, tuple[tuple[int, ...], str]]:
        if not self.xl_cache:
            return {}
        shape = (batch_size, self.window, self.num_heads, self.head_dim)
        return {"keys": (shape, dtype), "values": (shape, dtype)}

    def geometry(self) -> tuple[int, int]:
        """(number of keys per window block, offset of the first query among them)."""
        return (2 * self.window, self.window) if self.xl_cache else (self.window, 0)

    def blocked_keys(self, k, v, state: dict, start_of_sequence):
        """Keys and values per window block, (B, G, K, H, D), and the cache for the next segment.

        No stop_gradient on the carried cache: with stack-level windows (block feedback) it is
        differentiable within the segment; the model cuts the gradient when it stores state.
        """
        w, h, d = self.window, self.num_heads, self.head_dim
        kb = ops.reshape(k, (-1, k.shape[1] // w, w, h, d))
        vb = ops.reshape(v, (-1, v.shape[1] // w, w, h, d))
        if not self.xl_cache:
            return kb, vb, {}
        sos = ops.reshape(start_of_sequence, (-1, 1, 1, 1))
        cached_k, cached_v = ops.cast(state["keys"], k.dtype), ops.cast(state["values"], v.dtype)
        prev_k = ops.where(sos, ops.zeros_like(cached_k), cached_k)
        prev_v = ops.where(sos, ops.zeros_like(cached_v), cached_v)
        kw = ops.concatenate([ops.concatenate([prev_k[:, None], kb[:, :-1]], axis=1), kb], axis=2)
        vw = ops.concatenate([ops.concatenate([prev_v[:, None], vb[:, :-1]], axis=1), vb], axis=2)
        return kw, vw, {"keys": kb[:, -1], "values": vb[:, -1]}

    def call(self, q, k, v, state: dict, start_of_sequence, scale=None, seed_generator=None, training=False):
        """q, k, v (B, N, H, D), projected (and normalised) by the block; scale (H,) or None.

        Returns (y (B, N, H, D), new_state, (kw, vw, q_used)): the blocked keys and values, which the
        recurrent cell reads (unrotated, as meliad), and the queries as attention used them
        (B, N, H, D; rotated with rotary positions), which meliad's external attention reads too.
        """
        n, w, h, d = q.shape[1], self.window, self.num_heads, self.head_dim
        num_keys, offset = self.geometry()
        qb = ops.reshape(q, (-1, n // w, w, h, d))
        kw, vw, new_state = self.blocked_keys(k, v, state, start_of_sequence)
        bias = None
        qa, ka = qb, kw
        if self.position is not None:
            bias = self.position.compute_bias(w, num_keys, offset)
            qa, ka = self.position.transform(qb, kw, offset)
        mask = ops.convert_to_tensor(window_mask(w, num_keys, w, offset)) if self.use_causal_mask else None
        y = self.kernel.attend(qa, ka, vw, bias=bias, mask=mask, scale=scale,
                               dropout_mask=self._dropout_mask((h, w, num_keys), seed_generator, training))
        return ops.reshape(y, (-1, n, h, d)), new_state, (kw, vw, ops.reshape(qa, (-1, n, h, d)))

    def _dropout_mask(self, shape, seed_generator, training):
        """meliad's attention dropout: one (H, Q, K) mask shared by the batch and every window."""
        rate = self.attn_dropout
        if not training or rate <= 0.0:
            return None
        keep = 1.0 - rate
        return ops.cast(keras.random.uniform(shape, seed=seed_generator) < keep, self.compute_dtype) / keep

    # -- incremental decoding (meliad_core.decoding), one token at a time --------------------------

    def decode_spec(self, batch_size: int, dtype: str = "float32") -> dict[str, tuple[tuple[int, ...], str]]:
        """The key/value window buffer (B, K, H, D): [previous window | current window] with the XL
        cache (K = 2W), the current window (the segment) without it (K = W)."""
        shape = (batch_size, self.geometry()[0], self.num_heads, self.head_dim)
        return {"window_keys": (shape, dtype), "window_values": (shape, dtype)}

    def decode_state(self, state: dict, batch_size: int) -> dict:
        """The window buffer at a segment boundary from the carried cache (it becomes the last window)."""
        (shape, dtype), w = self.decode_spec(batch_size)["window_keys"], self.window
        if not self.xl_cache:
            return {"window_keys": ops.zeros(shape, dtype), "window_values": ops.zeros(shape, dtype)}
        pad = ops.zeros((batch_size, w, self.num_heads, self.head_dim), dtype)
        return {"window_keys": ops.concatenate([pad, ops.cast(state["keys"], dtype)], axis=1),
                "window_values": ops.concatenate([pad, ops.cast(state["values"], dtype)], axis=1)}

    def carried_state(self, decode_state: dict) -> dict:
        """The cache `call` would carry, from the buffer at a segment boundary (the inverse of decode_state)."""
        if not self.xl_cache:
            return {}
        return {"keys": decode_state["window_keys"][:, self.window:],
                "values": decode_state["window_values"][:, self.window:]}

    def decode_step(self, q, k, v, state: dict, index, start, scale=None):
        """One token: q, k, v (B, 1, H, D); index its position in the window (int scalar tensor);
        start (B,) bool, rows starting a document with this token (index 0 only).

        At index 0 the buffer's current window becomes the previous one (zeros for starting rows),
        then the token's key and value go into slot offset + index, and the query attends to the
        buffer through row `index` of the segment path's mask and bias: the W keys before it.
        Returns (y (B, 1, H, D), new_state, (keys, values (B, K, H, D), q_used (B, 1, H, D))).
        """
        from meliad_core.layers.attention import reference_attend  # the semantics every kernel equals

        w, h, d = self.window, self.num_heads, self.head_dim
        num_keys, offset = self.geometry()
        kb, vb = state["window_keys"], state["window_values"]
        if self.xl_cache:
            sos = ops.reshape(start, (-1, 1, 1, 1))

            def shift():
                last_k, last_v = kb[:, w:], vb[:, w:]
                return (ops.concatenate([ops.where(sos, ops.zeros_like(last_k), last_k), last_k], 1),
                        ops.concatenate([ops.where(sos, ops.zeros_like(last_v), last_v), last_v], 1))

            kb, vb = ops.cond(index == 0, shift, lambda: (kb, vb))
        at = (0, offset + index, 0, 0)
        kb = ops.slice_update(kb, at, ops.cast(k, kb.dtype))
        vb = ops.slice_update(vb, at, ops.cast(v, vb.dtype))
        kw, vw = ops.cast(kb, k.dtype), ops.cast(vb, v.dtype)
        qa, ka, bias = q[:, None], kw[:, None], None
        if self.position is not None:
            # Biases depend on j − (i + offset) only: row i of the (W, K) table is a K-slice of the row of
            # one query that sees K + W − 1 keys, so a token costs O(K), not O(W·K).
            row = self.position.compute_bias(1, num_keys + w - 1, offset + w - 1)
            bias = None if row is None else ops.slice(row, (0, 0, w - 1 - index), (h, 1, num_keys))
            qa, ka = self.position.transform(ops.repeat(qa, w, axis=2), ka, offset)
            qa = ops.expand_dims(ops.take(qa, index, axis=2), 2)
        mask = None
        if self.use_causal_mask:
            mask = ops.reshape(ops.take(ops.convert_to_tensor(window_mask(w, num_keys, w, offset)), index, axis=0),
                               (1, num_keys))
        y = reference_attend(qa, ka, vw[:, None], bias=bias, mask=mask, scale=scale)
        return ops.reshape(y, (-1, 1, h, d)), {"window_keys": kb, "window_values": vb}, (kw, vw, qa[:, 0])
