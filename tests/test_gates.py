"""Recurrence gates (plugins/meliad_recurrence), spec §8.4 / meliad `MLP._gate`: fixed, lstm, full, residual.
Each is checked against its formula, written out in numpy, on random inputs and random weights."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from meliad_core import plugins
from meliad_recurrence import make_fixed_gate, make_full_gate, make_lstm_gate, make_residual_gate
from meliad_recurrence.gates import FixedGate, FullGate, LSTMGate, ResidualGate

B, S, WIDTH, HIDDEN = 2, 3, 6, 10


def np_(x) -> np.ndarray:
    return np.array(ops.convert_to_numpy(ops.convert_to_tensor(x)), copy=True)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def weight(layer, name):
    (match,) = [w for w in layer.weights if w.path.split("/")[-1] == name]
    return match


def randomize(layer, rng) -> dict[str, np.ndarray]:
    values = {}
    for w in layer.weights:
        values[w.path.split("/")[-1]] = rng.normal(0, 0.7, size=tuple(w.shape)).astype("float32")
        w.assign(values[w.path.split("/")[-1]])
    return values


def inputs(rng):
    state, update = (rng.normal(size=(B, S, WIDTH)).astype("float32") for _ in range(2))
    hidden = rng.normal(size=(B, S, HIDDEN)).astype("float32")
    return state, update, hidden


def run(layer, state, update, hidden) -> np.ndarray:
    return np_(layer(ops.convert_to_tensor(state), ops.convert_to_tensor(update), ops.convert_to_tensor(hidden)))


def build(factory, name="gate_attn", width=WIDTH, hidden_dim=HIDDEN):
    layer = factory(width, hidden_dim, name)
    layer.build(None)
    return layer


pytestmark = pytest.mark.usefixtures("installed_plugins")


def test_gates_are_registered():
    registry = plugins.get_plugin_manager().registry("recurrence_gate")
    assert {"fixed", "lstm", "full", "residual"} <= set(registry)
    assert registry["full"].obj is make_full_gate and registry["residual"].obj is make_residual_gate
    assert all(registry[name].description for name in ("full", "residual"))


def test_full_gate_is_meliads_formula():
    rng = np.random.default_rng(0)
    layer = build(make_full_gate, name="gate_ffn")
    assert isinstance(layer, FullGate) and layer.name == "gate_ffn"
    assert {w.path.split("/")[-1]: tuple(w.shape) for w in layer.weights} == {
        "gate": (HIDDEN, WIDTH), "gate_bias": (WIDTH,)}
    weights = randomize(layer, rng)
    state, update, hidden = inputs(rng)
    g = sigmoid(hidden @ weights["gate"] + weights["gate_bias"] + 1.0)  # biased to remember
    np.testing.assert_allclose(run(layer, state, update, hidden), state * g + update * (1 - g), rtol=1e-5, atol=1e-6)


def test_full_gate_reads_the_hidden_activation():
    rng = np.random.default_rng(1)
    layer = build(make_full_gate)
    randomize(layer, rng)
    state, update, hidden = inputs(rng)
    assert not np.allclose(run(layer, state, update, hidden), run(layer, state, update, hidden * 3))


def test_full_gate_initialisers_are_meliads():
    # kernel: variance_scaling(0.1, fan_in, truncated normal) -> std sqrt(0.1/fan_in), |w| < 2 untruncated stds;
    # bias: N(0, 0.1)
    layer = build(make_full_gate, width=512, hidden_dim=256)
    kernel, bias = np_(weight(layer, "gate")), np_(weight(layer, "gate_bias"))
    std = np.sqrt(0.1 / 256)
    assert kernel.std() == pytest.approx(std, rel=0.05) and abs(kernel.mean()) < 0.05 * std
    # truncated at 2 std of the underlying normal: an untruncated normal of this std would put ~6,000 of
    # these 131k draws past it. Keras' torch sampler resamples 4 times and keeps an untruncated draw
    # when all 4 miss (p ≈ 4e-6 per entry), so on torch a handful may lie beyond.
    beyond = int(np.sum(np.abs(kernel) > 2 * std / 0.87962566 + 1e-6))
    assert beyond <= (5 if keras.backend.backend() == "torch" else 0), beyond
    assert bias.std() == pytest.approx(0.1, rel=0.15) and np.abs(bias).max() > 2 * 0.1 / 0.87962566 * 0.9


def test_residual_gate_adds_and_has_no_weights():
    rng = np.random.default_rng(2)
    layer = build(make_residual_gate)
    assert isinstance(layer, ResidualGate) and layer.weights == []
    state, update, hidden = inputs(rng)
    np.testing.assert_allclose(run(layer, state, update, hidden), state + update, rtol=1e-6)


def test_fixed_gate_is_meliads_formula():
    rng = np.random.default_rng(3)
    layer = build(make_fixed_gate)
    weights = randomize(layer, rng)
    state, update, hidden = inputs(rng)
    g = sigmoid(weights["gate_bias"])
    np.testing.assert_allclose(run(layer, state, update, hidden), state * g + update * (1 - g), rtol=1e-5, atol=1e-6)


def test_lstm_gate_is_meliads_formula():
    rng = np.random.default_rng(4)
    layer = build(make_lstm_gate)
    weights = randomize(layer, rng)
    state, update, hidden = inputs(rng)
    forget = sigmoid(hidden @ weights["forget_gate"] + weights["forget_gate_bias"] + 1.0)
    inp = sigmoid(hidden @ weights["input_gate"] + weights["input_gate_bias"] - 1.0)
    np.testing.assert_allclose(run(layer, state, update, hidden), state * forget + update * inp, rtol=1e-5, atol=1e-6)


def test_lstm_gate_biases_are_drawn_independently():
    layer = build(make_lstm_gate, width=64)
    assert not np.allclose(np_(weight(layer, "input_gate_bias")), np_(weight(layer, "forget_gate_bias")))


@pytest.mark.parametrize("cls,args", [(FixedGate, (WIDTH,)), (LSTMGate, (WIDTH, HIDDEN)),
                                      (FullGate, (WIDTH, HIDDEN)), (ResidualGate, (WIDTH, HIDDEN))])
def test_gates_serialize_with_get_config(cls, args):
    layer = cls(*args, name="gate_attn")
    config = layer.get_config()
    assert config["width"] == WIDTH and config["name"] == "gate_attn"
    clone = cls.from_config(config)
    assert clone.get_config() == config
    layer.build(None)
    clone.build(None)
    assert [(w.path, tuple(w.shape)) for w in clone.weights] == [(w.path, tuple(w.shape)) for w in layer.weights]


@pytest.mark.parametrize("gate,variant", [("full", "dual"), ("full", "skip"), ("residual", "dual"),
                                          ("residual", "single")])
def test_new_gates_run_in_a_recurrent_model(gate, variant):
    """The gate plugins plug into the recurrent cell: finite logits, and segments of W or 4W agree."""
    pytest.importorskip("meliad_core.assemble")
    from model_helpers import copy_trainable, make_model, randomize_weights, segment_batch, tiny_recipe, to_numpy

    def model(segment_length):
        return make_model(tiny_recipe("recurrent", window=4, segment_length=segment_length,
                                      recurrence={"gate": gate, "variant": variant}))

    def logits(m, tokens, n):
        return np.concatenate([to_numpy(m(segment_batch(tokens[:, s:s + n], s == 0)))
                               for s in range(0, tokens.shape[1], n)], axis=1)

    short, long = model(4), model(16)
    randomize_weights(short, seed=1)
    copy_trainable(short, long)
    tokens = np.random.default_rng(0).integers(1, 50, size=(2, 16)).astype("int32")
    a = logits(short, tokens, 4)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, logits(long, tokens, 16), rtol=1e-4, atol=1e-5)
    gate_weights = {w.path.split("/")[-1] for w in short.trainable_weights if "gate" in w.path}
    assert gate_weights == ({"gate", "gate_bias"} if gate == "full" else set())


@pytest.mark.parametrize("gate,bias", [("fixed", "gate_bias"), ("lstm", "forget_gate_bias"), ("full", "gate_bias")])
def test_bias_init_moves_the_retention_bias_only(gate, bias):
    """`recurrence.options.bias_init` (beyond meliad) shifts the mean of the bias that keeps the old state;
    the default (0) is meliad's N(0, 0.1)."""
    from meliad_core import assemble

    default = build(assemble.recurrence_gate(gate), width=512)
    shifted = build(assemble.recurrence_gate(gate, {"bias_init": 3.0}), width=512)
    assert abs(np_(weight(default, bias)).mean()) < 0.03
    assert np_(weight(shifted, bias)).mean() == pytest.approx(3.0, abs=0.03)
    assert np_(weight(shifted, bias)).std() == pytest.approx(0.1, rel=0.2)
    if gate == "lstm":  # the input gate keeps meliad's initialisation
        assert abs(np_(weight(shifted, "input_gate_bias")).mean()) < 0.03
    assert shifted.get_config()["bias_init"] == 3.0
    assert type(shifted).from_config(shifted.get_config()).bias_init == 3.0


def test_bias_init_is_validated_with_one_line():
    from meliad_core import assemble
    from meliad_core.config import RecipeError

    with pytest.raises(RecipeError, match=r"recurrence.options.bias_init: .*expected"):
        assemble.recurrence_gate("fixed", {"bias_init": "high"})
    with pytest.raises(RecipeError, match=r"recurrence.options.bias_init: .*unknown option of recurrence gate 'residual'"):
        assemble.recurrence_gate("residual", {"bias_init": 1.0})
