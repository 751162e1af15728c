"""One meliad transformer layer: the projections and the FFN around the three mechanisms (spec §14).

    xn = Norm(x) [+ dropout];  Q, K, V (and Q2) = projections of xn, keys/queries normalised
    y  = WindowedAttention(Q, K, V)                    windows with the XL cache (windowed_attention.py)
    [memory]     y = (1−g)·y + g·attend(Q, kNN(Q))     the kNN memory layer (knn_memory.py)
    [recurrence] y ⊕= tokens attending to the state    the block-recurrent cell (block_recurrence.py)
    [feedback]   y ⊕= tokens attending to another layer's state (block feedback, spec §8.6)
    h = x + concat_heads(y)·Wo;   out = h + dropout(act(Norm(h)·W1)·W2)

With `smear_keys` (beyond meliad) each head's key is σ(a)·K_t + (1 − σ(a))·K_(t−1) before it is
normalised (a learned per head, 0 at init), the previous token's key carried across segments: a key
then says which token came before it, so a one-layer copy ("induction") head can find where the
current token was followed before, locally and in the kNN memory (docs/long_range.md, experiment 14).

The layer is a function of (x, state, start_of_sequence) returning (out, new_state); its state is
the union of its mechanisms' states (`state_spec`).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from meliad_core.layers.block_recurrence import BlockRecurrence
from meliad_core.layers.common import ACTIVATIONS, LayerNorm, add_dense, dense, l2_normalize, merge_heads, \
    split_heads, tiled_dropout
from meliad_core.layers.knn_memory import KNNMemory
from meliad_core.layers.windowed_attention import WindowedAttention

PREVIOUS_KEY = "previous_key"  # state of `smear_keys`: the raw key of the segment's last token (B, H, D)


@keras.saving.register_keras_serializable(package="meliad")
class TransformerBlock(keras.layers.Layer):
    def __init__(self, *, embed_dim: int, num_heads: int, head_dim: int, mlp_dim: int, window: int,
                 xl_cache: bool = True, kernel: str = "auto", kernel_options: dict | None = None,
                 position: str = "t5", position_options: dict | None = None, normalize_keys: bool = True,
                 attention_scale_init: float = 1.0, dropout: float = 0.0, attn_dropout: float = 0.0, use_causal_mask: bool = True,
                 mlp_activation: str = "relu", mlp_use_bias: bool = False, norm_use_mean: bool = False,
                 norm_use_bias: bool = False, memory: dict | None = None, recurrence: dict | None = None,
                 feedback: bool = False, smear_keys: bool = False, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim, self.num_heads, self.head_dim, self.mlp_dim = embed_dim, num_heads, head_dim, mlp_dim
        self.normalize_keys, self.dropout = normalize_keys, dropout
        self.attention_scale_init = attention_scale_init
        self.smear_keys = smear_keys
        self.mlp_activation, self.mlp_use_bias = mlp_activation, mlp_use_bias
        self.memory_args = dict(memory) if memory else None
        self.recurrence_args = dict(recurrence) if recurrence else None
        self.feedback = feedback  # cross-attends to another layer's recurrent state
        self.cross = recurrence is not None or feedback
        self.seed = seed
        self._config = dict(embed_dim=embed_dim, num_heads=num_heads, head_dim=head_dim, mlp_dim=mlp_dim,
                            window=window, xl_cache=xl_cache, kernel=kernel, kernel_options=dict(kernel_options or {}),
                            position=position, position_options=dict(position_options or {}),
                            normalize_keys=normalize_keys, attention_scale_init=attention_scale_init,
                            dropout=dropout, attn_dropout=attn_dropout,
                            use_causal_mask=use_causal_mask, mlp_activation=mlp_activation,
                            mlp_use_bias=mlp_use_bias, norm_use_mean=norm_use_mean, norm_use_bias=norm_use_bias,
                            memory=self.memory_args, recurrence=self.recurrence_args, feedback=feedback,
                            smear_keys=smear_keys, seed=seed)
        norm = dict(use_mean=norm_use_mean, use_bias=norm_use_bias)
        self.pre_attn_norm = LayerNorm(name="pre_attn_layernorm", **norm)
        self.pre_ffn_norm = LayerNorm(name="pre_ffn_layernorm", **norm)
        self.attention = WindowedAttention(
            num_heads=num_heads, head_dim=head_dim, window=window, xl_cache=xl_cache, kernel=kernel,
            kernel_options=kernel_options, position=position, position_options=position_options,
            use_causal_mask=use_causal_mask, attn_dropout=attn_dropout, name="attention")
        self.memory = None
        if memory is not None:
            self.memory = KNNMemory(num_heads=num_heads, head_dim=head_dim, name="memory", **memory)
        self.recurrence = None
        if recurrence is not None:
            self.recurrence = BlockRecurrence(
                embed_dim=embed_dim, num_heads=num_heads, head_dim=head_dim, mlp_dim=mlp_dim,
                normalize_keys=normalize_keys, attention_scale_init=attention_scale_init, kernel=kernel,
                kernel_options=kernel_options,
                mlp_activation=mlp_activation, mlp_use_bias=mlp_use_bias, norm_use_mean=norm_use_mean,
                norm_use_bias=norm_use_bias, name="recurrent_tbase", **recurrence)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def get_config(self):
        return {**super().get_config(), **self._config}

    def build(self, input_shape=None):
        e, h, d, m = self.embed_dim, self.num_heads, self.head_dim, self.mlp_dim
        hd = h * d
        self.pre_attn_norm.build((None, None, e))
        self.w_q, _ = add_dense(self, e, hd, "queries")
        self.w_k, _ = add_dense(self, e, hd, "keys")
        self.w_v, _ = add_dense(self, e, hd, "values")
        self.key_smear = None
        if self.smear_keys:
            self.key_smear = self.add_weight(shape=(h,), initializer="zeros", name="key_smear")
        if self.cross:
            self.w_q2, _ = add_dense(self, e, hd, "queries2")
        # learned per-head scales only with normalised keys; otherwise queries carry 1/√D and no scale
        self.scale = self.scale2 = None
        if self.normalize_keys:
            init = keras.initializers.Constant(self.attention_scale_init)
            self.scale = self.add_weight(shape=(h,), initializer=init, name="attention_scale")
            if self.cross:
                self.scale2 = self.add_weight(shape=(h,), initializer=init, name="attention_scale2")
        self.w_out, self.b_out = add_dense(self, (2 if self.cross else 1) * hd, e, "post_attn", self.mlp_use_bias)
        self.pre_ffn_norm.build((None, None, e))
        self.w_1, self.b_1 = add_dense(self, e, m, "ffn_hidden", self.mlp_use_bias)
        self.w_2, self.b_2 = add_dense(self, m, e, "ffn_output", self.mlp_use_bias)
        self.attention.build(None)
        if self.memory is not None:
            self.memory.build(None)
        if self.recurrence is not None:
            self.recurrence.build(None)

    def state_spec(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name -> (shape, dtype) of everything this layer carries from one segment to the next."""
        spec = dict(self.attention.state_spec(batch_size))
        for mechanism in (self.memory, self.recurrence):
            if mechanism is not None:
                spec.update(mechanism.state_spec(batch_size))
        spec.update(self._smear_spec(batch_size))
        return spec

    def _smear_spec(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """`smear_keys`' carried state (in the segment and the decoding state alike)."""
        return {PREVIOUS_KEY: ((batch_size, self.num_heads, self.head_dim), "float32")} if self.smear_keys else {}

    def _queries(self, xn, weight):
        q = split_heads(ops.matmul(xn, weight), self.num_heads, self.head_dim)
        return l2_normalize(q) if self.normalize_keys else q * (1.0 / np.sqrt(self.head_dim))

    def call(self, x, state: dict, start_of_sequence, training: bool = False, feedback_kv=None,
             stream: str | None = None):
        """x (B, N, E); state as in `state_spec`; start_of_sequence (B,) bool.

        feedback_kv: (keys, values), each (B, S, H, D), of a recurrent state to cross-attend to
        (block feedback; only for layers built with feedback=True). stream: the model's stream, which
        a host memory store needs (a static string). Returns (y, new_state).
        """
        n, h, d = x.shape[1], self.num_heads, self.head_dim
        xn = tiled_dropout(self.pre_attn_norm(x), self.dropout, self.seed_generator, training)
        q, k, v, last_key = self._qkv(xn, state, start_of_sequence)
        y, new_state, (kw, vw, q_used) = self.attention(q, k, v, state, start_of_sequence, scale=self.scale,
                                                        seed_generator=self.seed_generator, training=training)
        if last_key is not None:
            new_state[PREVIOUS_KEY] = last_key
        if self.memory is not None:
            y, memory_state = self.memory(q, k, v, y, state, start_of_sequence, scale=self.scale,
                                          attend_queries=q_used, stream=stream)
            new_state.update(memory_state)
        if self.recurrence is not None:
            q2b = ops.reshape(self._queries(xn, self.w_q2), (-1, kw.shape[1], n // kw.shape[1], h, d))
            y_cross, recurrent_state = self.recurrence(q2b, kw, vw, state, start_of_sequence, token_scale=self.scale2)
            new_state.update(recurrent_state)
            y = ops.concatenate([y, ops.reshape(y_cross, (-1, n, h, d))], axis=2)
        elif self.feedback:
            if feedback_kv is None:
                raise ValueError(f"{self.name}: built for block feedback but called without feedback_kv")
            q2 = ops.reshape(self._queries(xn, self.w_q2), (-1, 1, n, h, d))
            fk, fv = feedback_kv
            y_cross = self.attention.kernel.attend(q2, fk[:, None], fv[:, None], scale=self.scale2)
            y = ops.concatenate([y, ops.reshape(y_cross, (-1, n, h, d))], axis=2)

        return self._output(x, y, training), new_state

    def _qkv(self, xn, state: dict, start):
        """Queries (normalised, or carrying 1/√D), keys (normalised) and values, each (B, T, H, D), and
        with `smear_keys` the raw key of the last token (B, H, D) to carry (else None). `start` (B,) bool:
        rows starting a document here, whose first token has no previous key."""
        h, d = self.num_heads, self.head_dim
        k = split_heads(ops.matmul(xn, self.w_k), h, d)
        last_key = None
        if self.key_smear is not None:
            previous = ops.cast(state[PREVIOUS_KEY], k.dtype)
            previous = ops.where(ops.reshape(start, (-1, 1, 1)), ops.zeros_like(previous), previous)
            shifted = ops.concatenate([previous[:, None], k[:, :-1]], axis=1)
            mix = ops.cast(ops.reshape(ops.sigmoid(self.key_smear), (1, 1, h, 1)), k.dtype)
            k, last_key = mix * k + (1.0 - mix) * shifted, k[:, -1]
        return (self._queries(xn, self.w_q), l2_normalize(k) if self.normalize_keys else k,
                split_heads(ops.matmul(xn, self.w_v), h, d), last_key)

    def _output(self, x, y, training: bool = False, decoding: bool = False):
        """x + concat_heads(y)·Wo, then the FFN residual (dropout only when training). Decoding calls
        the norm's `call` directly: Keras' layer-call machinery costs ~10% of an eager torch token."""
        hidden = x + dense(merge_heads(y), self.w_out, self.b_out)
        normed = self.pre_ffn_norm.call(hidden) if decoding else self.pre_ffn_norm(hidden)
        ffn = dense(ACTIVATIONS[self.mlp_activation](dense(normed, self.w_1, self.b_1)),
                    self.w_2, self.b_2)
        return hidden + tiled_dropout(ffn, self.dropout, self.seed_generator, training)

    def feedback_kv(self, state: dict, start_of_sequence):
        """Keys and values of this (recurrent) layer's state at the start of a window, for block feedback."""
        return self.recurrence.feedback_kv(state, start_of_sequence)

    # -- incremental decoding (meliad_core.decoding) -------------------------------------------------

    def decode_spec(self, batch_size: int, segment_length: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name -> (shape, dtype) of this layer's decoding state (see `decode_step`)."""
        spec = {**self.attention.decode_spec(batch_size), **self._smear_spec(batch_size)}
        if self.memory is not None:
            spec.update(self.memory.decode_spec(batch_size, segment_length))
        if self.recurrence is not None:
            spec.update(self.recurrence.decode_spec(batch_size))
        return spec

    def decode_state(self, state: dict, batch_size: int, segment_length: int) -> dict:
        """The decoding state at a segment boundary from the carried state `call` keeps."""
        spec = self.decode_spec(batch_size, segment_length)
        out = {key: ops.zeros(shape, dtype) for key, (shape, dtype) in spec.items()}
        out.update({key: ops.cast(value, spec[key][1]) for key, value in state.items() if key in spec})
        out.update(self.attention.decode_state(state, batch_size))
        return out

    def carried_state(self, decode_state: dict, batch_size: int) -> dict:
        """The state `call` carries, from the decoding state at a segment boundary."""
        out = {key: decode_state[key] for key in self.state_spec(batch_size) if key in decode_state}
        out.update(self.attention.carried_state(decode_state))
        return out

    def decode_step(self, x, state: dict, position, index, start, feedback_kv=None):
        """One token x (B, 1, E) at `position` of its segment and `index` of its window (int scalar
        tensors); start (B,) bool, rows starting a document with it. The recurrent state must have had
        `recurrence.decode_begin` this step. Returns (y (B, 1, E), new_state), equal to `call`'s row."""
        xn = self.pre_attn_norm.call(x)  # see _output
        q, k, v, last_key = self._qkv(xn, state, start)
        y, attention_state, (kw, vw, q_used) = self.attention.decode_step(q, k, v, state, index, start,
                                                                          scale=self.scale)
        new_state = {**state, **attention_state}
        if last_key is not None:
            new_state[PREVIOUS_KEY] = ops.cast(last_key, state[PREVIOUS_KEY].dtype)
        if self.memory is not None:
            y, memory_state = self.memory.decode_step(q, k, v, y, state, position, start, scale=self.scale,
                                                      attend_queries=q_used)
            new_state.update(memory_state)
        if self.recurrence is not None:
            y_cross, recurrent_state = self.recurrence.decode_step(
                self._queries(xn, self.w_q2), kw, vw, state, index, self.attention.window, token_scale=self.scale2)
            new_state.update(recurrent_state)
            y = ops.concatenate([y, y_cross], axis=2)
        elif self.feedback:
            fk, fv = feedback_kv
            q2 = self._queries(xn, self.w_q2)[:, None]
            y_cross = self.attention.kernel.attend(q2, ops.cast(fk, q2.dtype)[:, None],
                                                   ops.cast(fv, q2.dtype)[:, None], scale=self.scale2)
            y = ops.concatenate([y, y_cross[:, 0]], axis=2)
        return self._output(x, y, decoding=True), new_state
