"""Small recipes and utilities shared by the model tests."""

from __future__ import annotations

import copy

import keras
import numpy as np

from meliad_core.config import validate_recipe
from meliad_core.model import build_model

TINY_MODEL = dict(num_layers=2, embed_dim=16, num_heads=2, head_dim=8, mlp_dim=32, vocab_size=50,
                  dropout=0.0, attn_dropout=0.0)


def tiny_recipe(arch: str = "xl", window: int = 4, segment_length: int = 8, batch_size: int = 2, **sections):
    """A tiny recipe mapping; `arch` in xl, memory, recurrent. Extra sections deep-update it."""
    recipe = {
        "model": dict(TINY_MODEL),
        "attention": {"window": window},
        "data": {"segment_length": segment_length, "batch_size": batch_size},
    }
    if arch == "memory":
        recipe["attention"]["window"] = segment_length
        recipe["memory"] = {"layers": [-1], "size": 2 * segment_length, "neighbors": 4, "store": "bucketed"}
    elif arch == "recurrent":
        recipe["recurrence"] = {"layers": [-1], "num_states": 3, "gate": "fixed", "variant": "skip"}
    for section, values in sections.items():
        recipe.setdefault(section, {})
        recipe[section] = {**recipe[section], **values}
    return recipe


def make_model(mapping: dict, **kwargs):
    return build_model(validate_recipe(copy.deepcopy(mapping)), **kwargs)


def to_numpy(x) -> np.ndarray:
    return np.array(keras.ops.convert_to_numpy(x), copy=True)  # on torch a view would share storage


def randomize_weights(model, seed: int = 0) -> dict[str, np.ndarray]:
    """Gives every trainable weight a random value (not its init) so that tests see every parameter."""
    rng = np.random.default_rng(seed)
    values = {}
    for var in model.trainable_weights:
        shape = tuple(var.shape)
        if len(shape) == 2:
            value = rng.normal(0.0, 1.0 / np.sqrt(shape[0]), shape)
        else:
            value = rng.normal(0.0, 0.5, shape) + (1.0 if var.path.endswith(("scale", "scale2")) else 0.0)
        values[var.path] = value.astype("float32")
        var.assign(values[var.path])
    return values


def copy_trainable(source, target) -> None:
    for a, b in zip(source.trainable_weights, target.trainable_weights, strict=True):
        assert tuple(a.shape) == tuple(b.shape), (a.path, b.path)
        b.assign(a.value)


def segment_batch(tokens: np.ndarray, start: bool | np.ndarray) -> dict:
    sos = np.broadcast_to(np.asarray(start, bool), (tokens.shape[0],)).copy()
    return {"tokens": tokens.astype("int32"), "start_of_sequence": sos}


def input_gradient(fn, x: np.ndarray) -> np.ndarray:
    """d sum(fn(x)) / dx with the current backend's autodiff (tests only; the library never needs it)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda t: fn(t).sum())(x))
    if backend == "torch":
        t = keras.ops.convert_to_tensor(x).detach().requires_grad_(True)
        fn(t).sum().backward()
        return t.grad.cpu().numpy()
    import tensorflow as tf

    t = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(t)
        total = tf.reduce_sum(fn(t))
    return tape.gradient(total, t).numpy()


def metrics_rows(path) -> list[dict]:
    """A run's metrics.jsonl rows without the timing column (which differs between runs)."""
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    for row in rows:
        row.pop("tokens_per_second")
    return rows
