"""One meliad transformer layer: Transformer-XL attention over sliding windows, optionally with an
external kNN memory (Memorizing Transformer) or a recurrent cell (Block-Recurrent Transformer).

The layer is a function of (x, state, start_of_sequence) returning (y, new_state) (spec §14):

    xn = RMSNorm(x); K, V, Q (and Q2) = projections, keys/queries normalised
    prev K/V = XL cache, zeroed (not masked) where a document starts
    windows: each of the G = N/W windows attends to the previous window plus itself (2W keys),
             all windows at once in a blocked layout (B, G, 2W, H, D)
    [memory]     retrieve with Q before writing this segment's K/V; y = (1−g)·y + g·y_memory
    [recurrence] the state steps block by block; tokens of block w also attend to the state c_w
    y = x + concat_heads(...)·Wo;  out = y + dropout(relu(RMSNorm(y)·W1)·W2)

The carried state keeps its gradient within a segment (stack-level windows pass it from window to
window); the model stops the gradient when it stores the state for the next segment (truncated
backprop, as in meliad).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from meliad_core.config import MemoryConfig, ModelConfig, RecurrenceConfig
from meliad_core.layers.attention import window_mask
from meliad_core.layers.common import RMSNorm, kernel_init, l2_normalize, merge_heads, split_heads, tiled_dropout
from meliad_core.layers.memory import external_attention, filled_slots, reset_rows, write_segment
from meliad_core.layers.recurrence import RecurrentCell


class TransformerLayer(keras.layers.Layer):
    def __init__(self, *, model: ModelConfig, window: int, xl_cache: bool, kernel, position_bias_factory,
                 memory: MemoryConfig | None = None, memory_store=None, recurrence: RecurrenceConfig | None = None,
                 make_gate=None, feedback: bool = False, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.cfg = model
        self.window, self.xl_cache = window, xl_cache
        self.kernel = kernel
        self.memory, self.memory_store = memory, memory_store
        self.recurrence = recurrence
        self.feedback = feedback  # cross-attends to another layer's recurrent state (block feedback)
        self.cross = recurrence is not None or feedback
        self.pre_attn_norm = RMSNorm(name="pre_attn_layernorm")
        self.pre_ffn_norm = RMSNorm(name="pre_ffn_layernorm")
        self.position_bias = position_bias_factory(model.num_heads, model, "relative_positions")
        self.cell = None
        if recurrence is not None:
            self.cell = RecurrentCell(num_states=recurrence.num_states, embed_dim=model.embed_dim,
                                      num_heads=model.num_heads, head_dim=model.head_dim, mlp_dim=model.mlp_dim,
                                      variant=recurrence.variant, make_gate=make_gate,
                                      normalize_keys=model.normalize_keys, name="recurrent_tbase")
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape=None):
        model = self.cfg
        e, h, d, m = model.embed_dim, model.num_heads, model.head_dim, model.mlp_dim
        hd = h * d
        self.pre_attn_norm.build((None, None, e))
        self.w_q = self.add_weight(shape=(e, hd), initializer=kernel_init(), name="queries")
        self.w_k = self.add_weight(shape=(e, hd), initializer=kernel_init(), name="keys")
        self.w_v = self.add_weight(shape=(e, hd), initializer=kernel_init(), name="values")
        if self.cross:
            self.w_q2 = self.add_weight(shape=(e, hd), initializer=kernel_init(), name="queries2")
        # learned per-head scales only with normalised keys; otherwise queries carry 1/√D and no scale
        self.scale = self.scale2 = None
        if model.normalize_keys:
            self.scale = self.add_weight(shape=(h,), initializer="ones", name="attention_scale")
            if self.cross:
                self.scale2 = self.add_weight(shape=(h,), initializer="ones", name="attention_scale2")
        self.w_out = self.add_weight(shape=((2 if self.cross else 1) * hd, e), initializer=kernel_init(),
                                     name="post_attn")
        self.pre_ffn_norm.build((None, None, e))
        self.w_1 = self.add_weight(shape=(e, m), initializer=kernel_init(), name="ffn_hidden")
        self.w_2 = self.add_weight(shape=(m, e), initializer=kernel_init(), name="ffn_output")
        if self.position_bias is not None:
            self.position_bias.build(None)
        if self.memory is not None:
            self.memory_gate = self.add_weight(shape=(h,), initializer="zeros", name="external_memory_bias")
        if self.cell is not None:
            self.cell.build(None)

    # -- state -----------------------------------------------------------------------------------

    def state_shapes(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name -> (shape, dtype) of everything this layer carries from one segment to the next."""
        h, d, w = self.cfg.num_heads, self.cfg.head_dim, self.window
        shapes = {}
        if self.xl_cache:
            shapes["keys"] = ((batch_size, w, h, d), "float32")
            shapes["values"] = ((batch_size, w, h, d), "float32")
        if self.memory is not None:
            shapes["memory_keys"] = ((batch_size, h, self.memory.size, d), "float32")
            shapes["memory_values"] = ((batch_size, h, self.memory.size, d), "float32")
            shapes["memory_index"] = ((batch_size,), "int32")
        if self.recurrence is not None:
            shapes["recurrent_state"] = ((batch_size, self.recurrence.num_states, self.cfg.embed_dim), "float32")
        return shapes

    # -- forward ---------------------------------------------------------------------------------

    def _project(self, xn, weight):
        return split_heads(ops.matmul(xn, weight), self.cfg.num_heads, self.cfg.head_dim)

    def _queries(self, xn, weight):
        q = self._project(xn, weight)
        return l2_normalize(q) if self.cfg.normalize_keys else q * (1.0 / np.sqrt(self.cfg.head_dim))

    def _attn_dropout(self, shape, training):
        rate = self.cfg.attn_dropout
        if not training or rate <= 0.0:
            return None
        keep = 1.0 - rate
        return ops.cast(keras.random.uniform(shape, seed=self.seed_generator) < keep, self.compute_dtype) / keep

    def call(self, x, state: dict, start_of_sequence, training: bool = False, feedback_kv=None):
        """x (B, N, E); state as in `state_shapes`; start_of_sequence (B,) bool.

        feedback_kv: (keys, values), each (B, S, H, D), of a recurrent state to cross-attend to
        (block feedback; only for layers built with feedback=True).
        Returns (y, new_state).
        """
        cfg = self.cfg
        n, w = x.shape[1], self.window
        num_blocks = n // w
        h, d = cfg.num_heads, cfg.head_dim
        new_state = {}

        xn = tiled_dropout(self.pre_attn_norm(x), cfg.dropout, self.seed_generator, training)
        q = self._queries(xn, self.w_q)
        k = self._project(xn, self.w_k)
        k = l2_normalize(k) if cfg.normalize_keys else k
        v = self._project(xn, self.w_v)

        # Blocked sliding-window layout: block g holds window g's queries and windows g−1, g's keys.
        qb = ops.reshape(q, (-1, num_blocks, w, h, d))
        kb = ops.reshape(k, (-1, num_blocks, w, h, d))
        vb = ops.reshape(v, (-1, num_blocks, w, h, d))
        if self.xl_cache:
            sos = ops.reshape(start_of_sequence, (-1, 1, 1, 1))
            cached_k, cached_v = ops.cast(state["keys"], k.dtype), ops.cast(state["values"], v.dtype)
            prev_k = ops.where(sos, ops.zeros_like(cached_k), cached_k)
            prev_v = ops.where(sos, ops.zeros_like(cached_v), cached_v)
            kw = ops.concatenate([ops.concatenate([prev_k[:, None], kb[:, :-1]], axis=1), kb], axis=2)
            vw = ops.concatenate([ops.concatenate([prev_v[:, None], vb[:, :-1]], axis=1), vb], axis=2)
            num_keys, offset = 2 * w, w
            # No stop_gradient here: with stack-level windows (block feedback) this carry is
            # differentiable within the segment; the model cuts the gradient when it stores state.
            new_state["keys"] = kb[:, -1]
            new_state["values"] = vb[:, -1]
        else:  # one window covering the segment, no cache (meliad's "nocache" configs)
            kw, vw = kb, vb
            num_keys, offset = w, 0
        mask = ops.convert_to_tensor(window_mask(w, num_keys, w, offset))
        bias = None
        if self.position_bias is not None:
            bias = self.position_bias.compute_bias(w, num_keys, offset)
        y = self.kernel.attend(qb, kw, vw, bias=bias, mask=mask, scale=self.scale,
                               dropout_mask=self._attn_dropout((h, w, num_keys), training))
        y = ops.reshape(y, (-1, n, h, d))

        if self.memory is not None:
            y, memory_state = self._memory(q, k, v, y, state, start_of_sequence)
            new_state.update(memory_state)

        if self.recurrence is not None:
            q2b = ops.reshape(self._queries(xn, self.w_q2), (-1, num_blocks, w, h, d))
            y_cross, new_state["recurrent_state"] = self._recurrence(q2b, kw, vw, state, start_of_sequence)
            y = ops.concatenate([y, ops.reshape(y_cross, (-1, n, h, d))], axis=2)
        elif self.feedback:
            if feedback_kv is None:
                raise ValueError(f"{self.name}: built for block feedback but called without feedback_kv")
            q2 = ops.reshape(self._queries(xn, self.w_q2), (-1, 1, n, h, d))
            fk, fv = feedback_kv
            y_cross = self.kernel.attend(q2, fk[:, None], fv[:, None], scale=self.scale2)
            y = ops.concatenate([y, ops.reshape(y_cross, (-1, n, h, d))], axis=2)

        hidden = x + ops.matmul(merge_heads(y), self.w_out)
        ffn = ops.matmul(ops.relu(ops.matmul(self.pre_ffn_norm(hidden), self.w_1)), self.w_2)
        return hidden + tiled_dropout(ffn, cfg.dropout, self.seed_generator, training), new_state

    def _memory(self, q, k, v, y_local, state, start_of_sequence):
        """Retrieve-then-write against this layer's external memory; mixes with local attention by a gate."""
        mem = self.memory
        key_db, value_db, index = reset_rows(state["memory_keys"], state["memory_values"], state["memory_index"],
                                             start_of_sequence)
        q_t = ops.transpose(q, (0, 2, 1, 3))  # (B, H, N, D)
        # Retrieval sees neither the queries' nor the memory's gradient (the writes are stopped too);
        # the gradient reaches the current queries, the scale and the gate through the attention only.
        r_keys, r_values = self.memory_store.retrieve(key_db, value_db, filled_slots(index, mem.size),
                                                      ops.stop_gradient(q_t), mem.neighbors, mem.query_chunk)
        y_ext = ops.transpose(external_attention(q_t, r_keys, r_values, self.scale), (0, 2, 1, 3))
        gate = ops.reshape(ops.sigmoid(self.memory_gate), (1, 1, -1, 1))
        key_db, value_db, index = write_segment(key_db, value_db, index,
                                                ops.stop_gradient(ops.transpose(k, (0, 2, 1, 3))),
                                                ops.stop_gradient(ops.transpose(v, (0, 2, 1, 3))))
        new_state = {"memory_keys": key_db, "memory_values": value_db, "memory_index": index}
        return y_local * (1.0 - gate) + y_ext * gate, new_state

    def _recurrence(self, q2b, kw, vw, state, start_of_sequence):
        """Steps the recurrent state over the blocks; returns tokens→state attention and the final state."""
        cell = self.cell
        c = cell.start_state(ops.cast(state["recurrent_state"], kw.dtype), start_of_sequence)
        outputs = []
        for g in range(kw.shape[1]):  # the recurrence is sequential over blocks; the block count is small
            kr, vr, qr, q2r = cell.state_kvq(c)
            a_self = self.kernel.attend(qr[:, None], kr[:, None], vr[:, None], scale=cell.scale)
            a_cross = self.kernel.attend(q2r[:, None], kw[:, g:g + 1], vw[:, g:g + 1], scale=cell.scale2)
            attended = merge_heads(ops.concatenate([a_self[:, 0], a_cross[:, 0]], axis=2))
            # Tokens of block g read the state they started with (c), never c_next.
            outputs.append(self.kernel.attend(q2b[:, g:g + 1], kr[:, None], vr[:, None], scale=self.scale2))
            c = cell.update(c, attended)
        return ops.concatenate(outputs, axis=1), c  # the model stops the gradient when it stores c

    def feedback_kv(self, state, start_of_sequence):
        """Keys and values of this (recurrent) layer's state at the start of a window, for block feedback."""
        c = self.cell.start_state(state["recurrent_state"], start_of_sequence)
        kr, vr, _, _ = self.cell.state_kvq(c)
        return kr, vr
