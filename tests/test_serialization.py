"""Keras serialization: every layer round-trips through its config, and `model.save` / `load_model`
round-trip the whole model (weights and every stream's carried state) on every backend and across them."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from model_helpers import make_model, randomize_weights, tiny_recipe, to_numpy

GOLDEN = Path(__file__).parent / "golden"

CASES = {
    "xl": tiny_recipe("xl"),
    "memorizing": tiny_recipe("memory"),
    "recurrent_lstm_dual": tiny_recipe("recurrent", recurrence={"gate": "lstm", "variant": "dual"}),
    "feedback_with_options": tiny_recipe(
        "recurrent", recurrence={"variant": "single", "feedback": True},
        model={"mlp_activation": "swish", "mlp_use_bias": True, "norm_use_mean": True, "norm_use_bias": True,
               "final_mlp": True, "use_final_layernorm": False}),
}


def _segment(rng, starts):
    return {"tokens": rng.integers(1, 50, size=(2, 8)).astype("int32"), "start_of_sequence": np.array(starts)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_and_load_model_round_trip(case, tmp_path):
    model = make_model(CASES[case])
    randomize_weights(model, seed=3)
    rng = np.random.default_rng(4)
    model(_segment(rng, [True, True]))  # the predict stream now carries state
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(model) and loaded.get_config() == model.get_config()
    for stream in model.streams:  # state streams are saved with the weights
        before, after = model.get_stream_state(stream), loaded.get_stream_state(stream)
        assert sorted(before) == sorted(after)
        for key in before:
            np.testing.assert_array_equal(after[key], before[key], err_msg=f"{stream} {key}")
    assert any(v.any() for v in loaded.get_stream_state("predict").values())
    for var, other in zip(model.trainable_weights, loaded.trainable_weights, strict=True):
        assert var.path == other.path
        np.testing.assert_array_equal(to_numpy(other.value), to_numpy(var.value), err_msg=var.path)
    nxt = _segment(rng, [False, True])  # row 0 continues its document, row 1 starts a new one
    np.testing.assert_array_equal(to_numpy(loaded(nxt)), to_numpy(model(nxt)))


def test_every_layer_round_trips_through_its_config():
    model = make_model(CASES["feedback_with_options"])
    seen = set()
    for layer in model._flatten_layers(include_self=False):
        if type(layer).__module__.startswith("meliad_core"):
            config = keras.saving.serialize_keras_object(layer)
            clone = keras.saving.deserialize_keras_object(config)
            assert type(clone) is type(layer) and clone.get_config() == layer.get_config()
            seen.add(type(layer).__name__)
    assert {"DecoderStack", "TransformerBlock", "WindowedAttention", "BlockRecurrence", "LayerNorm",
            "FinalMLP"} <= seen
    memory = make_model(CASES["memorizing"]).stack.blocks[-1].memory
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(memory))
    assert clone.get_config() == memory.get_config() and clone.store_name == "bucketed"


def test_model_saved_on_jax_loads_here():
    """tests/golden/model_jax.keras was saved on JAX (make_keras_fixture.py) after one segment."""
    loaded = keras.models.load_model(GOLDEN / "model_jax.keras")
    expected = np.load(GOLDEN / "model_jax_next.npz")
    logits = to_numpy(loaded({"tokens": expected["tokens"], "start_of_sequence": expected["starts"]}))
    scale = float(np.abs(expected["logits"]).max())
    assert float(np.abs(logits - expected["logits"]).max()) <= 1e-5 * scale
