"""model.dtype: bfloat16 — Keras mixed precision: bfloat16 compute, float32 weights and optimizer
state, the norm statistics, logits and loss in float32 (as meliad), the kNN memory stored in bfloat16
(meliad's default; memory.dtype: float32 keeps it in float32)."""

from __future__ import annotations

import copy
import os

import keras
import numpy as np
import pytest

from meliad_core.config import validate_recipe
from meliad_core.data import keras_batches, stream
from meliad_core.model import build_model
from meliad_core.optimizers import make_optimizer
from meliad_core.recipes import load_recipe
from model_helpers import make_model, randomize_weights, tiny_recipe, to_numpy

# bfloat16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2%); two layers of projections,
# attention and FFN compound that to about 1-2% of the logits' scale on random weights, which is
# what all three backends show. meliad's own bf16 attention differs from f32 by up to ~0.2 absolute
# on unscaled random logits; ours are divided by sqrt(V), so we bound the difference relative to the
# largest logit instead: 5%.
TOLERANCE = 0.05


def _bf16(mapping: dict) -> dict:
    mapping = copy.deepcopy(mapping)
    mapping["model"]["dtype"] = "bfloat16"
    return mapping


@pytest.mark.parametrize("arch", ["xl", "memory", "recurrent"])
def test_bfloat16_logits_agree_with_float32(arch):
    recipe = tiny_recipe(arch)
    reference = make_model(recipe, streams=("predict",))
    weights = randomize_weights(reference, seed=1)
    model = make_model(_bf16(recipe), streams=("predict",))
    for var in model.trainable_weights:
        assert str(var.dtype) == "float32", var.path  # weights stay float32
        var.assign(weights[var.path])
    assert model.stack.blocks[0].compute_dtype == "bfloat16"
    if arch == "memory":  # memory.dtype auto: the model's dtype, as meliad stored its memory
        assert str(model.state_vars["predict"]["transformer1/memory_keys"].dtype) == "bfloat16"
    rng = np.random.default_rng(2)
    for i in range(3):
        batch = {"tokens": rng.integers(1, 50, size=(2, 8)).astype("int32"),
                 "start_of_sequence": np.array([i == 0, i == 0])}
        expected, logits = to_numpy(reference(batch)), to_numpy(model(batch))
        assert logits.dtype == np.float32  # logits (and the loss) in float32
        error = np.abs(logits - expected).max() / np.abs(expected).max()
        assert 0 < error <= TOLERANCE, f"segment {i}: relative error {error:.4f}"


def test_bfloat16_trains_with_float32_optimizer_state():
    recipe = validate_recipe(_bf16(tiny_recipe("recurrent", model={"vocab_size": 259})))
    model = build_model(recipe)
    model.compile(optimizer=make_optimizer(recipe.train))
    before = [to_numpy(v.value) for v in model.trainable_weights]
    history = model.fit(keras_batches(stream(recipe, split="train")), steps_per_epoch=3, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(str(v.dtype) == "float32" for v in model.optimizer.variables if "iteration" not in v.path)
    assert any(not np.array_equal(a, to_numpy(v.value)) for a, v in zip(before, model.trainable_weights))


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND") != "jax", reason="slow (two 200-step runs): the jax env runs it")
def test_bfloat16_quickstart_ends_within_two_percent_of_float32():
    results = {}
    for dtype in ("float32", "bfloat16"):
        recipe = load_recipe("quickstart", overrides=[f"model.dtype={dtype}", "train.steps=200"])
        keras.utils.set_random_seed(0)
        model = build_model(recipe)
        model.compile(optimizer=make_optimizer(recipe.train))
        model.fit(keras_batches(stream(recipe, split="train")), steps_per_epoch=200, epochs=1, verbose=0)
        metrics = model.evaluate(keras_batches(stream(recipe, split="eval")), steps=16, verbose=0, return_dict=True)
        results[dtype] = metrics["bits_per_token"]
    assert abs(results["bfloat16"] - results["float32"]) <= 0.02 * results["float32"], results
