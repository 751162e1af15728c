"""The recurrent cell of the Block-Recurrent Transformer (spec §8).

The state c (B, S, E) is read by every token of a window and written once per window. Per window w:
    R = Norm(c) + state_ids;  Kr, Vr, Qr, Q2r = projections of R (keys/queries normalised)
    a = concat_heads(attend(Qr -> Kr, Vr), attend(Q2r -> window keys/values))
    c_next = gated update of c from a (variant skip, single or dual; the gate is a plugin)
    tokens of window w attend (with the block's second queries) to Kr, Vr of the state they started with
The cell has no dropout: meliad runs it "pure". Rows starting a document start from a learned state.

State: {"recurrent_state"} (B, S, E).
"""

from __future__ import annotations

from typing import Protocol

import keras
from keras import ops

from meliad_core import assemble
from meliad_core.layers.common import ACTIVATIONS, LayerNorm, add_dense, dense, l2_normalize, merge_heads, split_heads


class RecurrenceGate(Protocol):
    """What a `recurrence_gate` plugin registers: `make_gate(width, hidden_dim, name) -> keras Layer`.

    The layer's `call(state, update, hidden)` returns the new state; `update` is the MLP output z
    (B, S, width) and `hidden` the MLP's last hidden activation (B, S, hidden_dim), which
    kernel-based gates (lstm, full) read.
    """

    def __call__(self, width: int, hidden_dim: int, name: str) -> keras.layers.Layer: ...


@keras.saving.register_keras_serializable(package="meliad")
class BlockRecurrence(keras.layers.Layer):
    """meliad's `recurrent_tbase` plus the learned initial state and the tokens' reads of the state."""

    def __init__(self, *, num_states: int, embed_dim: int, num_heads: int, head_dim: int, mlp_dim: int,
                 variant: str = "skip", gate: str = "fixed", gate_options: dict | None = None,
                 normalize_keys: bool = True, attention_scale_init: float = 1.0, kernel: str = "auto", kernel_options: dict | None = None,
                 mlp_activation: str = "relu", mlp_use_bias: bool = False, norm_use_mean: bool = False,
                 norm_use_bias: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.num_states, self.embed_dim = num_states, embed_dim
        self.num_heads, self.head_dim, self.mlp_dim = num_heads, head_dim, mlp_dim
        self.variant, self.gate_name, self.gate_options = variant, gate, dict(gate_options or {})
        self.normalize_keys, self.attention_scale_init = normalize_keys, attention_scale_init
        self.kernel_name, self.kernel_options = kernel, dict(kernel_options or {})
        self.mlp_activation, self.mlp_use_bias = mlp_activation, mlp_use_bias
        self.norm_use_mean, self.norm_use_bias = norm_use_mean, norm_use_bias
        self.kernel = assemble.attention_kernel(kernel, self.kernel_options)
        make_gate = assemble.recurrence_gate(gate, self.gate_options)
        norm = dict(use_mean=norm_use_mean, use_bias=norm_use_bias)
        self.norm = LayerNorm(name="pre_attn_layernorm", **norm)
        hd = num_heads * head_dim
        self.gate1 = make_gate(embed_dim, 2 * hd, "gate_attn") if variant in ("skip", "dual") else None
        self.gate2 = make_gate(embed_dim, mlp_dim, "gate_ffn") if variant in ("single", "dual") else None
        self.ffn_norm = LayerNorm(name="pre_ffn_layernorm", **norm) if variant == "dual" else None

    def get_config(self):
        return {**super().get_config(), "num_states": self.num_states, "embed_dim": self.embed_dim,
                "num_heads": self.num_heads, "head_dim": self.head_dim, "mlp_dim": self.mlp_dim,
                "variant": self.variant, "gate": self.gate_name, "gate_options": self.gate_options,
                "normalize_keys": self.normalize_keys, "attention_scale_init": self.attention_scale_init,
                "kernel": self.kernel_name,
                "kernel_options": self.kernel_options, "mlp_activation": self.mlp_activation,
                "mlp_use_bias": self.mlp_use_bias, "norm_use_mean": self.norm_use_mean,
                "norm_use_bias": self.norm_use_bias}

    def build(self, input_shape=None):
        e, hd, s, m = self.embed_dim, self.num_heads * self.head_dim, self.num_states, self.mlp_dim
        self.norm.build((None, None, e))
        self.initial_state = self.add_weight(shape=(s, e), name="recurrent_initial_state",
                                             initializer=keras.initializers.RandomNormal(stddev=0.1))
        self.state_ids = self.add_weight(shape=(s, e), name="state_ids",
                                         initializer=keras.initializers.RandomNormal(stddev=1.0))
        self.w_k, _ = add_dense(self, e, hd, "keys")
        self.w_v, _ = add_dense(self, e, hd, "values")
        self.w_q, _ = add_dense(self, e, hd, "queries")
        self.w_q2, _ = add_dense(self, e, hd, "queries2")
        self.scale = self.scale2 = None  # learned scales only with normalised keys, as on the token side
        if self.normalize_keys:
            init = keras.initializers.Constant(self.attention_scale_init)
            self.scale = self.add_weight(shape=(self.num_heads,), initializer=init, name="attention_scale")
            self.scale2 = self.add_weight(shape=(self.num_heads,), initializer=init, name="attention_scale2")
        if self.gate1 is not None:
            self.w_out, self.b_out = add_dense(self, 2 * hd, e, "post_attn", self.mlp_use_bias)
            self.gate1.build(None)
        if self.gate2 is not None:
            ffn_in = 2 * hd if self.variant == "single" else e
            if self.ffn_norm is not None:
                self.ffn_norm.build((None, None, e))
            self.w_1, self.b_1 = add_dense(self, ffn_in, m, "ffn_hidden", self.mlp_use_bias)
            self.w_2, self.b_2 = add_dense(self, m, e, "ffn_output", self.mlp_use_bias)
            self.gate2.build(None)

    def state_spec(self, batch_size: int, dtype: str = "float32") -> dict[str, tuple[tuple[int, ...], str]]:
        return {"recurrent_state": ((batch_size, self.num_states, self.embed_dim), dtype)}

    # -- the cell ---------------------------------------------------------------------------------

    def start_state(self, cached_state, start_of_sequence):
        """The learned initial state for rows starting a document, else the carried one."""
        init = ops.cast(self.initial_state, cached_state.dtype)[None]  # the variable's dtype may differ
        return ops.where(ops.reshape(start_of_sequence, (-1, 1, 1)), init, cached_state)

    def state_kvq(self, state):
        """Keys, values, queries and cross-queries of the state, each (B, S, H, D)."""
        r = self.norm(state) + ops.cast(self.state_ids, state.dtype)
        h, d = self.num_heads, self.head_dim
        k, v, q, q2 = (split_heads(ops.matmul(r, w), h, d) for w in (self.w_k, self.w_v, self.w_q, self.w_q2))
        if self.normalize_keys:
            return l2_normalize(k), v, l2_normalize(q), l2_normalize(q2)
        scale = 1.0 / (d ** 0.5)
        return k, v, q * scale, q2 * scale

    def update(self, state, attended):
        """c_next from the concatenated (self, cross) attention output `attended` (B, S, 2·H·D)."""
        act = ACTIVATIONS[self.mlp_activation]
        if self.variant == "skip":
            return self.gate1(state, dense(attended, self.w_out, self.b_out), attended)
        if self.variant == "dual":
            h = self.gate1(state, dense(attended, self.w_out, self.b_out), attended)
            hidden = act(dense(self.ffn_norm(h), self.w_1, self.b_1))
            return self.gate2(h, dense(hidden, self.w_2, self.b_2), hidden)
        hidden = act(dense(attended, self.w_1, self.b_1))  # single: no projection, no norm, tanh output
        return self.gate2(state, ops.tanh(dense(hidden, self.w_2, self.b_2)), hidden)

    # -- over a segment ---------------------------------------------------------------------------

    def call(self, q2b, kw, vw, state: dict, start_of_sequence, token_scale=None):
        """Steps the state over the windows of a segment.

        q2b: the tokens' second queries (B, G, W, H, D); kw, vw: the windows' keys and values
        (B, G, K, H, D); token_scale: the block's attention_scale2. Returns the tokens' attention to
        the state (B, G, W, H, D) and the new state. The model stops the gradient when it stores it.
        """
        c = self.start_state(ops.cast(state["recurrent_state"], kw.dtype), start_of_sequence)
        outputs = []
        for g in range(kw.shape[1]):  # sequential over windows; the window count is small
            kr, vr, qr, q2r = self.state_kvq(c)
            a_self = self.kernel.attend(qr[:, None], kr[:, None], vr[:, None], scale=self.scale)
            a_cross = self.kernel.attend(q2r[:, None], kw[:, g:g + 1], vw[:, g:g + 1], scale=self.scale2)
            attended = merge_heads(ops.concatenate([a_self[:, 0], a_cross[:, 0]], axis=2))
            # Tokens of window g read the state they started with (c), never c_next.
            outputs.append(self.kernel.attend(q2b[:, g:g + 1], kr[:, None], vr[:, None], scale=token_scale))
            c = self.update(c, attended)
        return ops.concatenate(outputs, axis=1), {"recurrent_state": c}

    def feedback_kv(self, state: dict, start_of_sequence):
        """Keys and values of the state at the start of a window, for block feedback (spec §8.6)."""
        c = self.start_state(state["recurrent_state"], start_of_sequence)
        kr, vr, _, _ = self.state_kvq(c)
        return kr, vr

    # -- incremental decoding (meliad_core.decoding) -------------------------------------------------

    def decode_spec(self, batch_size: int, dtype: str = "float32") -> dict[str, tuple[tuple[int, ...], str]]:
        """The state at the current window's start, and its keys and values (read by every token)."""
        kv = ((batch_size, self.num_states, self.num_heads, self.head_dim), dtype)
        return {**self.state_spec(batch_size, dtype), "state_keys": kv, "state_values": kv}

    def decode_begin(self, state: dict, position, start) -> dict:
        """At a segment's first token: the learned initial state for starting rows, and the state's
        keys and values (recomputed once per segment; within it they follow the window updates)."""
        def begin():
            c = self.start_state(state["recurrent_state"], start)
            kr, vr, _, _ = self.state_kvq(c)
            return c, ops.cast(kr, c.dtype), ops.cast(vr, c.dtype)

        c, kr, vr = ops.cond(position == 0, begin,
                             lambda: (state["recurrent_state"], state["state_keys"], state["state_values"]))
        return {**state, "recurrent_state": c, "state_keys": kr, "state_values": vr}

    def decode_step(self, q2, keys, values, state: dict, index, window: int, token_scale=None):
        """One token (after `decode_begin`): q2 (B, 1, H, D) reads the state as it was at the window's
        start; at the window's last token (index = window − 1) the state steps once with the window's
        keys and values (B, K, H, D), as `call` does. Returns (y (B, 1, H, D), new_state)."""
        from meliad_core.layers.attention import reference_attend

        kr, vr = state["state_keys"], state["state_values"]
        y = reference_attend(q2[:, None], ops.cast(kr, q2.dtype)[:, None], ops.cast(vr, q2.dtype)[:, None],
                             scale=token_scale)

        def step():
            c = ops.cast(state["recurrent_state"], keys.dtype)
            k_s, v_s, q_s, q2_s = self.state_kvq(c)
            a_self = reference_attend(q_s[:, None], k_s[:, None], v_s[:, None], scale=self.scale)
            a_cross = reference_attend(q2_s[:, None], keys[:, None], values[:, None], scale=self.scale2)
            c = self.update(c, merge_heads(ops.concatenate([a_self[:, 0], a_cross[:, 0]], axis=2)))
            k_n, v_n, _, _ = self.state_kvq(c)
            dtype = state["recurrent_state"].dtype
            return ops.cast(c, dtype), ops.cast(k_n, dtype), ops.cast(v_n, dtype)

        c, kr, vr = ops.cond(index == window - 1, step, lambda: (state["recurrent_state"], kr, vr))
        return y[:, 0], {"recurrent_state": c, "state_keys": kr, "state_values": vr}
