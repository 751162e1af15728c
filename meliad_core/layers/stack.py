"""The decoder stack (spec §5.3): tied N(0,1) embedding, L transformer layers, final RMSNorm, logits.

With block feedback (spec §8.6) the whole stack runs window by window so that every other layer
can cross-attend to the recurrent state as it stood at the start of the window.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from meliad_core.config import Recipe
from meliad_core.layers.attention import select_kernel
from meliad_core.layers.common import RMSNorm, tiled_dropout
from meliad_core.layers.transformer import TransformerLayer
from meliad_core.plugins import resolve


def absolute_position_embeddings(length: int, width: int) -> np.ndarray:
    """meliad's sinusoids for positions 0..length−1 of a segment: angle π·k/wavelength with
    wavelengths 10000^t, t evenly spaced in [0, 1); the cosine block first, then the sine block."""
    half = width // 2
    wavelengths = 10000.0 ** (np.arange(half, dtype=np.float64) / half)
    angles = np.pi * np.arange(length, dtype=np.float64)[:, None] / wavelengths[None, :]
    embeddings = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    if width % 2:
        embeddings = np.pad(embeddings, ((0, 0), (0, 1)))
    return embeddings.astype("float32")


def logit_divisor(logit_scale: str, vocab_size: int, embed_dim: int) -> float:
    """meliad divides the tied logits by √V (2022 code); later code by √E (spec §5.6)."""
    return {"sqrt_vocab": math.sqrt(vocab_size), "sqrt_embed": math.sqrt(embed_dim), "none": 1.0}[logit_scale]


class DecoderStack(keras.layers.Layer):
    def __init__(self, recipe: Recipe, vocab_size: int, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        model = recipe.model
        backend = keras.backend.backend()
        self.recipe = recipe
        self.vocab_size = vocab_size
        self.divisor = logit_divisor(model.logit_scale, vocab_size, model.embed_dim)
        kernel = select_kernel(recipe.attention.kernel, backend)
        position_bias = resolve("position_bias", model.position_bias, backend)
        memory_store = resolve("memory_store", recipe.memory.store, backend) if recipe.memory else None
        make_gate = resolve("recurrence_gate", recipe.recurrence.gate, backend) if recipe.recurrence else None
        self.feedback = bool(recipe.recurrence and recipe.recurrence.feedback)
        self.recurrent_index = recipe.recurrent_layers[-1] if recipe.recurrent_layers else None  # highest wins
        self.blocks = []
        for i in range(model.num_layers):
            is_memory = i in recipe.memory_layers
            is_recurrent = i in recipe.recurrent_layers
            self.blocks.append(TransformerLayer(
                model=model, window=recipe.attention.window, xl_cache=recipe.attention.xl_cache, kernel=kernel,
                position_bias_factory=position_bias,
                memory=recipe.memory if is_memory else None, memory_store=memory_store,
                recurrence=recipe.recurrence if is_recurrent else None, make_gate=make_gate,
                feedback=self.feedback and not is_recurrent,
                seed=None if seed is None else seed + 1 + i, name=f"transformer{i}"))
        self.final_norm = RMSNorm(name="final_layernorm")
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape=None):
        e = self.recipe.model.embed_dim
        self.embedding = self.add_weight(shape=(self.vocab_size, e), name="embedding",
                                         initializer=keras.initializers.RandomNormal(stddev=1.0))
        for block in self.blocks:
            block.build(None)
        self.final_norm.build((None, None, e))

    def state_shapes(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Flat 'transformer{i}/name' -> (shape, dtype) of all carried state."""
        return {f"{block.name}/{key}": spec for block in self.blocks
                for key, spec in block.state_shapes(batch_size).items()}

    def split_state(self, state: dict) -> list[dict]:
        """Flat 'transformer{i}/name' state -> one {name: value} dict per layer."""
        per_layer = [{} for _ in self.blocks]
        index = {block.name: i for i, block in enumerate(self.blocks)}
        for key, value in state.items():
            layer, name = key.split("/", 1)
            per_layer[index[layer]][name] = value
        return per_layer

    def call(self, tokens, state: dict, start_of_sequence, training: bool = False):
        """tokens (B, N) int; state as in `state_shapes`. Returns (logits (B, N, V), new_state)."""
        x = ops.take(ops.cast(self.embedding, self.compute_dtype), tokens % self.vocab_size, axis=0)
        if self.recipe.model.absolute_positions:
            x = x + ops.cast(absolute_position_embeddings(x.shape[1], x.shape[2]), x.dtype)[None]
        per_layer = self.split_state(state)
        if self.feedback:
            x, per_layer = self._feedback_windows(x, per_layer, start_of_sequence, training)
        else:
            for i, block in enumerate(self.blocks):
                x, per_layer[i] = block(x, per_layer[i], start_of_sequence, training=training)
        y = tiled_dropout(self.final_norm(x), self.recipe.model.dropout, self.seed_generator, training)
        logits = ops.matmul(ops.cast(y, "float32"), ops.transpose(ops.cast(self.embedding, "float32")))
        new_state = {f"{block.name}/{key}": value for block, layer_state in zip(self.blocks, per_layer)
                     for key, value in layer_state.items()}
        return logits / self.divisor, new_state

    def _feedback_windows(self, x, per_layer, start_of_sequence, training):
        """Runs the whole stack on one window at a time (meliad's dstack windows + feedback_recurrence)."""
        w = self.recipe.attention.window
        rec = self.blocks[self.recurrent_index]
        outputs = []
        sos = start_of_sequence
        for g in range(x.shape[1] // w):
            h = x[:, g * w:(g + 1) * w]
            fkv = rec.feedback_kv(per_layer[self.recurrent_index], sos)
            for i, block in enumerate(self.blocks):
                extra = {} if i == self.recurrent_index else {"feedback_kv": fkv}
                h, per_layer[i] = block(h, per_layer[i], sos, training=training, **extra)
            outputs.append(h)
            sos = ops.zeros_like(start_of_sequence)
        return ops.concatenate(outputs, axis=1), per_layer
