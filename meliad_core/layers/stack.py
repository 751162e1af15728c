"""The decoder stack (spec §5.3): tied embedding, L transformer blocks, final norm, logits.

With block feedback (spec §8.6) the whole stack runs window by window so that every other layer
can cross-attend to the recurrent state as it stood at the start of the window.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from meliad_core.layers.block import TransformerBlock
from meliad_core.layers.common import LayerNorm, add_dense, dense, tiled_dropout
from meliad_core.layers.positions import absolute_position_embeddings


def logit_divisor(logit_scale: str, vocab_size: int, embed_dim: int) -> float:
    """meliad divides the tied logits by √V (2022 code); later code by √E (spec §5.6)."""
    return {"sqrt_vocab": math.sqrt(vocab_size), "sqrt_embed": math.sqrt(embed_dim), "none": 1.0}[logit_scale]


@keras.saving.register_keras_serializable(package="meliad")
class DecoderStack(keras.layers.Layer):
    """Takes plain values only (see `meliad_core.assemble.stack_arguments`), so it serialises with get_config."""

    def __init__(self, *, vocab_size: int, num_layers: int, embed_dim: int, num_heads: int, head_dim: int,
                 mlp_dim: int, window: int, xl_cache: bool = True, kernel: str = "auto",
                 kernel_options: dict | None = None, position: str = "t5", position_options: dict | None = None,
                 absolute_positions: bool = False, normalize_keys: bool = True,
                 attention_scale_init: float = 1.0, dropout: float = 0.0,
                 attn_dropout: float = 0.0, final_dropout: float = 0.0, logit_scale: str = "sqrt_vocab",
                 mlp_activation: str = "relu", mlp_use_bias: bool = False, norm_use_mean: bool = False,
                 norm_use_bias: bool = False, use_causal_mask: bool = True, embedding_stddev: float = 1.0,
                 use_final_layernorm: bool = True, final_mlp: bool = False, memory_layers=(), memory=None,
                 recurrent_layers=(), recurrence=None, feedback: bool = False, smear_keys: bool = False,
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self._config = {key: value for key, value in locals().items()
                        if key not in ("self", "kwargs", "__class__")}
        self._config["memory_layers"] = [int(i) for i in memory_layers]
        self._config["recurrent_layers"] = [int(i) for i in recurrent_layers]
        self.vocab_size, self.embed_dim = vocab_size, embed_dim
        self.window = window
        self.absolute_positions = absolute_positions
        self.final_dropout, self.embedding_stddev = final_dropout, embedding_stddev
        self.divisor = logit_divisor(logit_scale, vocab_size, embed_dim)
        self.feedback = feedback
        self.recurrent_index = max(recurrent_layers) if recurrent_layers else None  # the highest wins (meliad)
        self.blocks = []
        for i in range(num_layers):
            is_recurrent = i in recurrent_layers
            self.blocks.append(TransformerBlock(
                embed_dim=embed_dim, num_heads=num_heads, head_dim=head_dim, mlp_dim=mlp_dim, window=window,
                xl_cache=xl_cache, kernel=kernel, kernel_options=kernel_options, position=position,
                position_options=position_options, normalize_keys=normalize_keys,
                attention_scale_init=attention_scale_init, dropout=dropout,
                attn_dropout=attn_dropout, use_causal_mask=use_causal_mask, mlp_activation=mlp_activation,
                mlp_use_bias=mlp_use_bias, norm_use_mean=norm_use_mean, norm_use_bias=norm_use_bias,
                memory=memory if i in memory_layers else None,
                recurrence=recurrence if is_recurrent else None, feedback=feedback and not is_recurrent,
                smear_keys=smear_keys, seed=None if seed is None else seed + 1 + i, name=f"transformer{i}"))
        self.final_norm = None
        if use_final_layernorm:
            self.final_norm = LayerNorm(name="final_layernorm", use_mean=norm_use_mean, use_bias=norm_use_bias)
        self.final_mlp = FinalMLP(embed_dim, mlp_dim, name="final_mlp") if final_mlp else None
        self.seed_generator = keras.random.SeedGenerator(seed)

    def get_config(self):
        return {**super().get_config(), **self._config}

    def build(self, input_shape=None):
        e = self.embed_dim
        self.embedding = self.add_weight(shape=(self.vocab_size, e), name="embedding",
                                         initializer=keras.initializers.RandomNormal(stddev=self.embedding_stddev))
        for block in self.blocks:
            block.build(None)
        if self.final_norm is not None:
            self.final_norm.build((None, None, e))
        if self.final_mlp is not None:
            self.final_mlp.build(None)

    def state_spec(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Flat 'transformer{i}/name' -> (shape, dtype) of all carried state."""
        return {f"{block.name}/{key}": spec for block in self.blocks
                for key, spec in block.state_spec(batch_size).items()}

    def split_state(self, state: dict) -> list[dict]:
        """Flat 'transformer{i}/name' state -> one {name: value} dict per layer."""
        per_layer = [{} for _ in self.blocks]
        index = {block.name: i for i, block in enumerate(self.blocks)}
        for key, value in state.items():
            layer, name = key.split("/", 1)
            per_layer[index[layer]][name] = value
        return per_layer

    def call(self, tokens, state: dict, start_of_sequence, training: bool = False, stream: str | None = None):
        """tokens (B, N) int; state as in `state_spec`; stream: the model's stream, for host memory stores.
        Returns (logits (B, N, V), new_state)."""
        x = ops.take(ops.cast(self.embedding, self.compute_dtype), tokens % self.vocab_size, axis=0)
        if self.absolute_positions:
            x = x + ops.cast(absolute_position_embeddings(x.shape[1], x.shape[2]), x.dtype)[None]
        per_layer = self.split_state(state)
        if self.feedback:
            x, per_layer = self._feedback_windows(x, per_layer, start_of_sequence, training, stream)
        else:
            for i, block in enumerate(self.blocks):
                x, per_layer[i] = block(x, per_layer[i], start_of_sequence, training=training, stream=stream)
        return self._logits(x, training), self._merge_state(per_layer)

    def _logits(self, x, training: bool = False, decoding: bool = False):
        """Final norm, final dropout, final MLP, then the tied embedding divided by the logit scale.
        Decoding calls the norm's `call` directly (Keras' layer-call overhead, see TransformerBlock._output)."""
        if self.final_norm is not None:
            x = self.final_norm.call(x) if decoding else self.final_norm(x)
        y = tiled_dropout(x, self.final_dropout, self.seed_generator, training)
        if self.final_mlp is not None:
            y = self.final_mlp(y)
        logits = ops.matmul(ops.cast(y, "float32"), ops.transpose(ops.cast(self.embedding, "float32")))
        return logits / self.divisor

    def _merge_state(self, per_layer: list[dict]) -> dict:
        """One {name: value} dict per layer -> the flat 'transformer{i}/name' state."""
        return {f"{block.name}/{key}": value for block, layer_state in zip(self.blocks, per_layer)
                for key, value in layer_state.items()}

    def _feedback_windows(self, x, per_layer, start_of_sequence, training, stream=None):
        """Runs the whole stack on one window at a time (meliad's dstack windows + feedback_recurrence)."""
        w = self.window
        rec = self.blocks[self.recurrent_index]
        outputs = []
        sos = start_of_sequence
        for g in range(x.shape[1] // w):
            h = x[:, g * w:(g + 1) * w]
            fkv = rec.feedback_kv(per_layer[self.recurrent_index], sos)
            for i, block in enumerate(self.blocks):
                extra = {} if i == self.recurrent_index else {"feedback_kv": fkv}
                h, per_layer[i] = block(h, per_layer[i], sos, training=training, stream=stream, **extra)
            outputs.append(h)
            sos = ops.zeros_like(start_of_sequence)
        return ops.concatenate(outputs, axis=1), per_layer

    # -- incremental decoding (meliad_core.decoding) -----------------------------------------------

    def _block_length(self, segment_length: int) -> int:
        """The segment length each block sees: the window with block feedback (the stack runs per window)."""
        return self.window if self.feedback else segment_length


    def decode_spec(self, batch_size: int, segment_length: int) -> dict:
        """Flat 'transformer{i}/name' -> (shape, dtype) of the decoding state."""
        n = self._block_length(segment_length)
        return {f"{block.name}/{key}": spec for block in self.blocks
                for key, spec in block.decode_spec(batch_size, n).items()}


    def decode_state(self, state: dict, batch_size: int, segment_length: int) -> dict:
        """The decoding state at a segment boundary from the flat carried state (`state_spec`)."""
        n = self._block_length(segment_length)
        return {f"{block.name}/{key}": value for block, layer in zip(self.blocks, self.split_state(state))
                for key, value in block.decode_state(layer, batch_size, n).items()}


    def carried_state(self, decode_state: dict, batch_size: int) -> dict:
        """The flat carried state (`state_spec`) from the decoding state at a segment boundary."""
        return {f"{block.name}/{key}": value for block, layer in zip(self.blocks, self.split_state(decode_state))
                for key, value in block.carried_state(layer, batch_size).items()}


    def decode_step(self, tokens, state: dict, position, start_of_sequence, segment_length: int):
        """One token per row: tokens (B, 1) int at `position` (int scalar tensor) of a segment of
        `segment_length`; start_of_sequence (B,) bool acts only at position 0. Returns (logits (B, 1, V),
        new_state), equal to the row `call` computes for that position when fed the same text as segments."""
        x = ops.take(ops.cast(self.embedding, self.compute_dtype), tokens % self.vocab_size, axis=0)
        if self.absolute_positions:
            table = ops.cast(absolute_position_embeddings(segment_length, x.shape[2]), x.dtype)
            x = x + ops.reshape(ops.take(table, position, axis=0), (1, 1, -1))
        start = ops.logical_and(ops.reshape(ops.cast(start_of_sequence, "bool"), (-1,)), position == 0)
        per_layer = self.split_state(state)
        index = position % self.window
        block_position = index if self.feedback else position
        for i, block in enumerate(self.blocks):
            if block.recurrence is not None:
                per_layer[i] = block.recurrence.decode_begin(per_layer[i], position, start)
        feedback_kv = None
        if self.feedback:
            rec = per_layer[self.recurrent_index]
            feedback_kv = (rec["state_keys"], rec["state_values"])
        for i, block in enumerate(self.blocks):
            extra = {"feedback_kv": feedback_kv} if self.feedback and i != self.recurrent_index else {}
            x, per_layer[i] = block.decode_step(x, per_layer[i], block_position, index, start, **extra)
        return self._logits(x, decoding=True), self._merge_state(per_layer)


@keras.saving.register_keras_serializable(package="meliad")
class FinalMLP(keras.layers.Layer):
    """meliad's optional MLP before the logits (options/final_mlp.gin): relu(y·W0)·W1, no biases."""

    def __init__(self, embed_dim: int, hidden_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim, self.hidden_dim = embed_dim, hidden_dim

    def build(self, input_shape=None):
        self.w_hidden, _ = add_dense(self, self.embed_dim, self.hidden_dim, "hidden0")
        self.w_output, _ = add_dense(self, self.hidden_dim, self.embed_dim, "output_layer")

    def call(self, x):
        return dense(ops.relu(dense(x, self.w_hidden)), self.w_output)

    def get_config(self):
        return {**super().get_config(), "embed_dim": self.embed_dim, "hidden_dim": self.hidden_dim}
