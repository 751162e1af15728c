"""The recurrent cell of the Block-Recurrent Transformer: the state ("horizontal") side (spec §8).

The state c (B, S, E) is read and written once per block. Per block:
    R = RMSNorm(c) + state_ids;  Kr, Vr, Qr, Q2r = projections of R (keys/queries normalised)
    a = concat_heads(attend(Qr -> Kr, Vr), attend(Q2r -> block keys/values))
    c_next = gated update of c from a (variant skip, single or dual; gate from a plugin)
The token side (the layer's own queries attending to Kr, Vr) lives in the transformer layer.
"""

from __future__ import annotations

from typing import Protocol

import keras
from keras import ops

from meliad_core.layers.common import RMSNorm, kernel_init, l2_normalize, split_heads


class RecurrenceGate(Protocol):
    """What a `recurrence_gate` plugin registers: `make_gate(width, hidden_dim, name) -> keras Layer`.

    The layer's `call(state, update, hidden)` returns the new state; `update` is the MLP output z
    (B, S, width) and `hidden` the MLP's last hidden activation (B, S, hidden_dim), which LSTM-style
    gates read.
    """

    def __call__(self, width: int, hidden_dim: int, name: str) -> keras.layers.Layer: ...


class RecurrentCell(keras.layers.Layer):
    """meliad's `recurrent_tbase` plus the learned initial state. No dropout: meliad runs it "pure"."""

    def __init__(self, *, num_states: int, embed_dim: int, num_heads: int, head_dim: int, mlp_dim: int,
                 variant: str, make_gate, normalize_keys: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.num_states, self.embed_dim = num_states, embed_dim
        self.num_heads, self.head_dim, self.mlp_dim = num_heads, head_dim, mlp_dim
        self.variant, self.normalize_keys = variant, normalize_keys
        self.norm = RMSNorm(name="pre_attn_layernorm")
        hd = num_heads * head_dim
        self.gate1 = make_gate(embed_dim, 2 * hd, "gate_attn") if variant in ("skip", "dual") else None
        self.gate2 = make_gate(embed_dim, mlp_dim, "gate_ffn") if variant in ("single", "dual") else None
        self.ffn_norm = RMSNorm(name="pre_ffn_layernorm") if variant == "dual" else None

    def build(self, input_shape=None):
        e, hd, s, m = self.embed_dim, self.num_heads * self.head_dim, self.num_states, self.mlp_dim
        self.norm.build((None, None, e))
        self.initial_state = self.add_weight(shape=(s, e), name="recurrent_initial_state",
                                             initializer=keras.initializers.RandomNormal(stddev=0.1))
        self.state_ids = self.add_weight(shape=(s, e), name="state_ids",
                                         initializer=keras.initializers.RandomNormal(stddev=1.0))
        self.w_k = self.add_weight(shape=(e, hd), initializer=kernel_init(), name="keys")
        self.w_v = self.add_weight(shape=(e, hd), initializer=kernel_init(), name="values")
        self.w_q = self.add_weight(shape=(e, hd), initializer=kernel_init(), name="queries")
        self.w_q2 = self.add_weight(shape=(e, hd), initializer=kernel_init(), name="queries2")
        self.scale = self.scale2 = None  # learned scales only with normalised keys, as on the token side
        if self.normalize_keys:
            self.scale = self.add_weight(shape=(self.num_heads,), initializer="ones", name="attention_scale")
            self.scale2 = self.add_weight(shape=(self.num_heads,), initializer="ones", name="attention_scale2")
        if self.gate1 is not None:
            self.w_out = self.add_weight(shape=(2 * hd, e), initializer=kernel_init(), name="post_attn")
            self.gate1.build(None)
        if self.gate2 is not None:
            ffn_in = 2 * hd if self.variant == "single" else e
            if self.ffn_norm is not None:
                self.ffn_norm.build((None, None, e))
            self.w_1 = self.add_weight(shape=(ffn_in, m), initializer=kernel_init(), name="ffn_hidden")
            self.w_2 = self.add_weight(shape=(m, e), initializer=kernel_init(), name="ffn_output")
            self.gate2.build(None)

    def start_state(self, cached_state, start_of_sequence):
        """The learned initial state for slots starting a document, else the carried one."""
        init = ops.cast(self.initial_state, cached_state.dtype)[None]  # the variable's dtype may differ
        return ops.where(ops.reshape(start_of_sequence, (-1, 1, 1)), init, cached_state)

    def state_kvq(self, state):
        """Keys, values, queries and cross-queries of the state, each (B, S, H, D)."""
        r = self.norm(state) + ops.cast(self.state_ids, state.dtype)
        h, d = self.num_heads, self.head_dim
        k = split_heads(ops.matmul(r, self.w_k), h, d)
        v = split_heads(ops.matmul(r, self.w_v), h, d)
        q = split_heads(ops.matmul(r, self.w_q), h, d)
        q2 = split_heads(ops.matmul(r, self.w_q2), h, d)
        if self.normalize_keys:
            return l2_normalize(k), v, l2_normalize(q), l2_normalize(q2)
        scale = 1.0 / (d ** 0.5)
        return k, v, q * scale, q2 * scale

    def update(self, state, attended):
        """c_next from the concatenated (self, cross) attention output `attended` (B, S, 2·H·D)."""
        if self.variant == "skip":
            return self.gate1(state, ops.matmul(attended, self.w_out), attended)
        if self.variant == "dual":
            h = self.gate1(state, ops.matmul(attended, self.w_out), attended)
            hidden = ops.relu(ops.matmul(self.ffn_norm(h), self.w_1))
            return self.gate2(h, ops.matmul(hidden, self.w_2), hidden)
        hidden = ops.relu(ops.matmul(attended, self.w_1))  # single: no projection, no norm, tanh output
        return self.gate2(state, ops.tanh(ops.matmul(hidden, self.w_2)), hidden)

    def get_config(self):
        raise NotImplementedError("RecurrentCell is built by TransformerLayer; it is not serialised alone")
