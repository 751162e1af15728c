"""Adafactor (flax semantics, spec §10.1) against a plain numpy reference, and make_optimizer."""

import keras
import numpy as np
import pytest
from keras import ops

from meliad_core.config import (AdafactorConfig, AdamConfig, LearningRateConfig, RecipeError, TrainConfig,
                                validate_recipe)
from meliad_core.optimizers import Adafactor, factored_dims, make_optimizer
from meliad_core.schedules import MeliadSchedule


# ---------------------------------------------------------------------------------------------
# Reference: the update of spec §10.1 written out in numpy (float64), one step at a time.
# `axes` = (largest, second) for a factored parameter, None for a full second moment.


def rms(x):
    return np.sqrt(np.mean(np.square(x)))


def reference_second_moment(G, state, rho, axes):
    """Returns v̂ and updates `state` in place."""
    if axes is None:
        state["v"] = rho * state.get("v", 0.0) + (1 - rho) * G
        return state["v"]
    largest, second = axes
    # Move the factored axes to the end as (.., second, largest) and loop over the rest.
    Gm = np.moveaxis(G, (second, largest), (-2, -1))
    batch_shape, (n_rows, n_cols) = Gm.shape[:-2], Gm.shape[-2:]
    R = state.get("R", np.zeros(batch_shape + (n_rows,)))
    C = state.get("C", np.zeros(batch_shape + (n_cols,)))
    v_hat = np.zeros_like(Gm)
    for b in np.ndindex(*batch_shape):
        for i in range(n_rows):  # R: mean of G over the largest axis
            R[b + (i,)] = rho * R[b + (i,)] + (1 - rho) * sum(Gm[b + (i, j)] for j in range(n_cols)) / n_cols
        for j in range(n_cols):  # C: mean of G over the second-largest axis
            C[b + (j,)] = rho * C[b + (j,)] + (1 - rho) * sum(Gm[b + (i, j)] for i in range(n_rows)) / n_rows
        mean_R = sum(R[b + (i,)] for i in range(n_rows)) / n_rows
        for i in range(n_rows):
            for j in range(n_cols):
                v_hat[b + (i, j)] = R[b + (i,)] * C[b + (j,)] / mean_R
    state["R"], state["C"] = R, C
    return np.moveaxis(v_hat, (-2, -1), (second, largest))


def reference_adafactor(param, grads, lrs, axes, beta1=0.9, clipping_threshold=1.0, decay_rate=0.8):
    """Parameter values after each step (stored as float32, as the variable is) and the final momentum.

    `grads` is a list of gradients, or a function of the current parameter giving its gradient."""
    p = np.asarray(param, np.float32)
    state, m, history = {}, np.zeros(p.shape), []
    for t, lr in enumerate(lrs):
        g = np.asarray(grads(p) if callable(grads) else grads[t], np.float64)
        rho = 1.0 - (t + 1.0) ** -decay_rate
        G = g * g + 1e-30
        v_hat = reference_second_moment(G, state, rho, axes)
        u = g / np.sqrt(v_hat)
        if clipping_threshold is not None:
            u = u / max(1.0, rms(u) / clipping_threshold)
        step = lr * max(rms(p.astype(np.float64)), 1e-3) * u
        if beta1 is not None:
            m = beta1 * m + (1 - beta1) * step
            step = m
        p = (p.astype(np.float64) - step).astype(np.float32)
        history.append(p)
    return history, m


def run_keras(param, grads, lr, **kwargs):
    variable = keras.Variable(np.asarray(param, np.float32), dtype="float32")
    optimizer = Adafactor(learning_rate=lr, **kwargs)
    history = []
    for g in grads:
        optimizer.apply([ops.convert_to_tensor(np.asarray(g, np.float32))], [variable])
        history.append(ops.convert_to_numpy(variable.value))
    return history, optimizer, variable


def random_case(shape, steps=3, seed=0):
    rng = np.random.default_rng(seed)
    param = rng.normal(size=shape).astype(np.float32)
    # Gradients of varying size per step and per row, so the second moments really differ.
    grads = [(rng.normal(size=shape) * rng.uniform(0.1, 3.0) * rng.uniform(0.5, 2.0, size=shape[-1:]))
             .astype(np.float32) for _ in range(steps)]
    return param, grads


CASES = [
    ((7,), None),                  # vector: full second moment
    ((3, 4), None),                # small matrix
    ((127, 200), None),            # second-largest dim below 128: not factored
    ((128, 130), (1, 0)),          # factored: R over axis 1, C over axis 0
    ((130, 128), (0, 1)),          # the largest axis first
    ((128, 128), (1, 0)),          # a tie: the later axis counts as the larger
    ((2, 128, 256), (2, 1)),       # rank 3: axis 0 is a batch axis
    ((256, 3, 128), (0, 2)),
]


@pytest.mark.parametrize("shape,axes", CASES)
def test_factored_dims(shape, axes):
    assert factored_dims(shape) == axes


@pytest.mark.parametrize("shape,axes", CASES[:4] + [CASES[6]])
def test_matches_numpy_reference(shape, axes):
    param, grads = random_case(shape)
    lr = 0.37
    expected, m_expected = reference_adafactor(param, grads, [lr] * 3, axes)
    actual, optimizer, variable = run_keras(param, grads, lr)
    for step, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7, err_msg=f"step {step}")
    # Momentum state too; and the parameter really moved.
    m_actual = ops.convert_to_numpy(optimizer._m[0].value)
    np.testing.assert_allclose(m_actual, m_expected, rtol=1e-5, atol=1e-6 * np.abs(m_expected).max())
    assert np.abs(actual[-1] - param).max() > 1e-3


def test_matches_reference_without_momentum_or_clipping():
    param, grads = random_case((128, 130), seed=3)
    expected, _ = reference_adafactor(param, grads, [0.05] * 3, (1, 0), beta1=None, clipping_threshold=None)
    actual, optimizer, _ = run_keras(param, grads, 0.05, beta1=None, clipping_threshold=None)
    assert optimizer._m == [None]
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7)


def test_slot_shapes_and_float32_accumulators():
    kernel = keras.Variable(np.zeros((2, 128, 256)), dtype="bfloat16")
    bias = keras.Variable(np.zeros((5,)), dtype="bfloat16")
    optimizer = Adafactor()
    optimizer.build([kernel, bias])
    assert tuple(optimizer._v_row[0].shape) == (2, 128, 1)
    assert tuple(optimizer._v_col[0].shape) == (2, 1, 256)
    assert optimizer._v[0] is None and optimizer._v_row[1] is None
    assert tuple(optimizer._v[1].shape) == (5,)
    slots = [v for group in (optimizer._v_row, optimizer._v_col, optimizer._v, optimizer._m)
             for v in group if v is not None]
    assert all(any(v is w for w in optimizer.variables) for v in slots)  # tracked, so checkpointed
    assert len(slots) == 5 and all(v.dtype == "float32" for v in slots)
    rng = np.random.default_rng(0)
    grads = [ops.convert_to_tensor(rng.normal(size=v.shape), dtype="bfloat16") for v in (kernel, bias)]
    optimizer.apply(grads, [kernel, bias])
    assert kernel.dtype == "bfloat16"
    assert np.all(np.isfinite(ops.convert_to_numpy(ops.cast(kernel.value, "float32"))))


def test_first_step_with_warmup_changes_nothing():
    schedule = MeliadSchedule(LearningRateConfig(), warmup=10, total_steps=100)
    param, grads = random_case((3, 4), seed=1)
    actual, optimizer, _ = run_keras(param, grads, schedule)
    np.testing.assert_array_equal(actual[0], param)
    assert np.abs(actual[1] - param).max() > 0
    # Step 1 used ρ = 1 − 2^−0.8 on the v accumulated at step 0, exactly as the reference does.
    lrs = [schedule.value_at(t) for t in range(3)]
    expected, _ = reference_adafactor(param, grads, lrs, None)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7)


def test_zero_parameter_moves_by_the_scale_floor():
    rng = np.random.default_rng(2)
    g = rng.normal(size=(6,)).astype(np.float32)
    lr = 0.2
    actual, _, _ = run_keras(np.zeros(6), [g], lr)
    # First step: v = g² (+1e-30), so u = sign(g) with RMS 1 (no clipping); scale = the 1e-3 floor;
    # and momentum starts from 0, so the parameter moves by 0.1 · step.
    np.testing.assert_allclose(actual[0], -0.1 * lr * 1e-3 * np.sign(g), rtol=1e-6)


def test_momentum_is_applied_to_the_lr_scaled_step():
    param, grads = random_case((4,), steps=2, seed=4)
    with_momentum, _, _ = run_keras(param, grads, 0.1)
    plain, _, _ = run_keras(param, grads, 0.1, beta1=None)
    step0 = plain[0] - param
    np.testing.assert_allclose(with_momentum[0] - param, 0.1 * step0, rtol=1e-5)
    # Second step: m = 0.9·m0 + 0.1·step1, where step1 is the plain optimizer's second step
    # (the same ρ, v and gradients, only taken from a different parameter).
    expected, _ = reference_adafactor(param, grads, [0.1, 0.1], None)
    np.testing.assert_allclose(with_momentum[1], expected[1], rtol=1e-6, atol=1e-7)


def test_update_clipping():
    rng = np.random.default_rng(5)
    param = rng.normal(size=(50,)).astype(np.float32)
    small = rng.normal(size=(50,)).astype(np.float32) * 1e-3
    big = small * 1e3  # v still remembers the small gradient, so u = g/√v̂ is large
    lr = 0.1
    clipped, _, _ = run_keras(param, [small, big], lr, beta1=None)
    unclipped, _, _ = run_keras(param, [small, big], lr, beta1=None, clipping_threshold=None)
    scale = max(rms(clipped[0].astype(np.float64)), 1e-3)
    delta = (clipped[0] - clipped[1]).astype(np.float64)
    # Clipped to RMS(u) = 1, so the step's RMS is exactly lr · RMS(param).
    assert rms(delta) == pytest.approx(lr * scale, rel=1e-4)
    assert rms((unclipped[0] - unclipped[1]).astype(np.float64)) > 1.2 * rms(delta)
    expected, _ = reference_adafactor(param, [small, big], [lr, lr], None, beta1=None)
    np.testing.assert_allclose(clipped[1], expected[1], rtol=1e-6, atol=1e-7)


def test_config_round_trip():
    schedule = MeliadSchedule(LearningRateConfig(schedule="rsqrt_std"), warmup=100, total_steps=1000)
    optimizer = Adafactor(learning_rate=schedule, beta1=None, min_dim_size_to_factor=64)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(optimizer))
    assert isinstance(restored, Adafactor)
    assert restored.beta1 is None and restored.min_dim_size_to_factor == 64 and restored.decay_rate == 0.8
    assert isinstance(restored._learning_rate, MeliadSchedule)
    assert restored._learning_rate.value_at(500) == schedule.value_at(500)


# ---------------------------------------------------------------------------------------------
# make_optimizer and model.fit on the current backend.


def test_make_optimizer_adafactor_and_adam():
    train = TrainConfig(steps=500, warmup=10, learning_rate=LearningRateConfig(max_steps=200))
    adafactor = make_optimizer(train)
    assert isinstance(adafactor, Adafactor)
    assert adafactor._learning_rate.max_steps == 200 and adafactor._learning_rate.base_lr == 1.0
    adam = make_optimizer(TrainConfig(optimizer="adam", warmup=0), total_steps=100)
    assert isinstance(adam, keras.optimizers.Adam)
    assert adam.beta_1 == 0.9 and adam.beta_2 == 0.98
    assert adam._learning_rate.value_at(0) == pytest.approx(0.05 * 0.01)
    assert make_optimizer(TrainConfig(steps=7))._learning_rate.max_steps == 7


def test_model_fit_matches_the_reference():
    """The whole compiled path (JAX's stateless apply, tf.function, torch) against numpy: a bias-free
    128x130 Dense layer (factored) trained on mean squared error for 3 steps."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(32, 128)).astype(np.float32)
    y = rng.normal(size=(32, 130)).astype(np.float32)
    w0 = (rng.normal(size=(128, 130)) / 11).astype(np.float32)
    layer = keras.layers.Dense(130, use_bias=False)
    model = keras.Sequential([keras.Input((128,)), layer])
    layer.kernel.assign(w0)
    model.compile(optimizer=Adafactor(learning_rate=0.3), loss="mse")
    model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)

    def mse_gradient(w):
        w = w.astype(np.float64)
        return 2.0 / y.size * x.T.astype(np.float64) @ (x @ w - y)

    expected, _ = reference_adafactor(w0, mse_gradient, [0.3] * 3, (1, 0))
    np.testing.assert_allclose(ops.convert_to_numpy(layer.kernel.value), expected[-1], rtol=1e-5, atol=1e-6)
    assert np.abs(expected[-1] - w0).max() > 1e-3


@pytest.mark.parametrize("optimizer_name", ["adafactor", "adam"])
def test_model_fit_decreases_the_loss(optimizer_name):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 128)).astype(np.float32)
    y = (x @ rng.normal(size=(128, 1)) / 8.0).astype(np.float32)
    model = keras.Sequential([keras.Input((128,)), keras.layers.Dense(130), keras.layers.Dense(1)])
    lr = LearningRateConfig(schedule="constant", max=0.1 if optimizer_name == "adafactor" else 0.05)
    optimizer = make_optimizer(TrainConfig(optimizer=optimizer_name, steps=3, warmup=0, learning_rate=lr))
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    losses = history.history["loss"] + [model.evaluate(x, y, verbose=0)]
    assert int(ops.convert_to_numpy(optimizer.iterations.value)) == 3
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    if optimizer_name == "adafactor":  # the 128x130 kernel is factored
        assert sum(v is not None for v in optimizer._v_row) == 1


def test_model_fit_with_an_embedding():
    """TensorFlow gives an embedding lookup's gradient as sparse row slices; they must be densified
    (repeated ids summed) before Adafactor's second moment. The 300x128 table is factored."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 300, size=(16, 8)).astype("int32")
    x[:, 0] = 7  # a repeated id
    y = rng.normal(size=(16, 8, 1)).astype(np.float32)
    model = keras.Sequential([keras.Input((8,), dtype="int32"), keras.layers.Embedding(300, 128),
                              keras.layers.Dense(1)])
    table = model.layers[0].embeddings
    before = ops.convert_to_numpy(table.value).copy()
    optimizer = Adafactor(learning_rate=0.1)
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    losses = history.history["loss"] + [model.evaluate(x, y, verbose=0)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    after = ops.convert_to_numpy(table.value)
    unused = sorted(set(range(300)) - set(x.ravel().tolist()))
    np.testing.assert_array_equal(after[unused], before[unused])  # zero gradient: u = 0, m stays 0
    assert np.abs(after[7] - before[7]).max() > 0
    assert optimizer._v_row[0] is not None


# ---------------------------------------------------------------------------------------------
# The recipe's optimizer keys: train.adafactor (beta1, decay_rate, base_lr), train.adam (beta1, beta2,
# weight_decay, base_lr), wired through make_optimizer.


def constant_lr(value):
    return LearningRateConfig(schedule="constant", max=value)


def apply_steps(optimizer, param, grads):
    variable = keras.Variable(np.asarray(param, np.float32), dtype="float32")
    history = []
    for g in grads:
        optimizer.apply([ops.convert_to_tensor(np.asarray(g, np.float32))], [variable])
        history.append(ops.convert_to_numpy(variable.value).astype(np.float64))
    return history


def reference_flax_adam(param, grads, lrs, beta1, beta2, weight_decay, eps=1e-8):
    """flax.optim.Adam.apply_param_gradient, in float64: bias-corrected moments, eps after the
    correction, then the decoupled decay new_param -= lr·weight_decay·param (of the old param)."""
    p = np.asarray(param, np.float64)
    m, v, history = np.zeros_like(p), np.zeros_like(p), []
    for t, (g, lr) in enumerate(zip(grads, lrs)):
        g = np.asarray(g, np.float64)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1 ** (t + 1)), v / (1 - beta2 ** (t + 1))
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps) - lr * weight_decay * p
        history.append(p)
    return history


def test_adam_weight_decay_shrinks_a_parameter_with_zero_gradient_by_lr_times_wd():
    # lr = base_lr 0.05 · constant 0.2 = 0.01; wd 0.5: every step multiplies the parameter by 1 − 0.005.
    train = TrainConfig(optimizer="adam", warmup=0, learning_rate=constant_lr(0.2),
                        adam=AdamConfig(weight_decay=0.5))
    optimizer = make_optimizer(train)
    assert optimizer.weight_decay == 0.5
    param = np.array([1.0, -2.0, 0.25, 0.0], np.float32)
    history = apply_steps(optimizer, param, [np.zeros(4)] * 3)
    for n, value in enumerate(history, start=1):
        np.testing.assert_allclose(value, param * (1 - 0.01 * 0.5) ** n, rtol=1e-6)
    # Without weight decay (meliad's default) the parameter does not move at all.
    plain = make_optimizer(TrainConfig(optimizer="adam", warmup=0, learning_rate=constant_lr(0.2)))
    assert plain.weight_decay is None
    np.testing.assert_array_equal(apply_steps(plain, param, [np.zeros(4)] * 3)[-1], param)


def test_adam_matches_flax_with_decay_betas_base_lr_and_warmup():
    """Every train.adam key at a non-default value, the decay scaled by the *scheduled* lr (0 at step 0
    in warmup, so the first step changes nothing), against flax's Adam written out in numpy."""
    config = AdamConfig(base_lr=0.5, beta1=0.8, beta2=0.9, weight_decay=0.3)
    train = TrainConfig(optimizer="adam", steps=4, warmup=2, learning_rate=constant_lr(0.1), adam=config)
    optimizer = make_optimizer(train)
    assert (optimizer.beta_1, optimizer.beta_2, optimizer.epsilon) == (0.8, 0.9, 1e-8)
    lrs = [optimizer._learning_rate.value_at(t) for t in range(4)]
    assert lrs == pytest.approx([0.0, 0.025, 0.05, 0.05])  # 0.5 · 0.1 · min(t, 2)/2
    rng = np.random.default_rng(7)
    param = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)) for _ in range(4)]  # far above eps: Keras' eps placement is moot
    actual = apply_steps(optimizer, param, grads)
    expected = reference_flax_adam(param, grads, lrs, 0.8, 0.9, 0.3)
    np.testing.assert_array_equal(actual[0], param)
    for step, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
    without = reference_flax_adam(param, grads, lrs, 0.8, 0.9, 0.0)
    assert np.abs(expected[-1] - without[-1]).max() > 1e-3  # the decay really mattered


def test_adafactor_beta1_zero_or_null_means_no_momentum():
    """beta1 0 (or null) takes the whole step at once: from a zero parameter the first step is
    lr · max(RMS(p), 1e-3) · sign(g) = lr·1e-3·sign(g), not the 0.1 of it that momentum 0.9 takes."""
    rng = np.random.default_rng(8)
    g = rng.normal(size=(6,)).astype(np.float32)
    for beta1 in (0.0, None):
        train = TrainConfig(warmup=0, learning_rate=constant_lr(0.2), adafactor=AdafactorConfig(beta1=beta1))
        optimizer = make_optimizer(train)
        assert isinstance(optimizer, Adafactor) and optimizer.beta1 == beta1
        (after,) = apply_steps(optimizer, np.zeros(6), [g])
        np.testing.assert_allclose(after, -0.2 * 1e-3 * np.sign(g), rtol=1e-6)
        assert optimizer._m == [None]  # no momentum slot to checkpoint
    default = make_optimizer(TrainConfig(warmup=0, learning_rate=constant_lr(0.2)))
    np.testing.assert_allclose(apply_steps(default, np.zeros(6), [g])[0], -0.1 * 0.2 * 1e-3 * np.sign(g), rtol=1e-6)


@pytest.mark.parametrize("decay_rate", [0.5, 0.8, 1.0])
def test_adafactor_decay_rate_sets_rho(decay_rate):
    """After two steps the unfactored second moment is ρ₁·g₀² + (1 − ρ₁)·g₁² (+1e-30), ρ₁ = 1 − 2^−decay_rate
    (ρ₀ = 0 whatever the rate), and the parameters follow the reference with that rate."""
    rng = np.random.default_rng(9)
    param = rng.normal(size=(7,)).astype(np.float32)
    grads = [rng.normal(size=(7,)).astype(np.float32) * s for s in (1.0, 3.0, 0.5)]
    train = TrainConfig(warmup=0, learning_rate=constant_lr(0.3), adafactor=AdafactorConfig(decay_rate=decay_rate))
    optimizer = make_optimizer(train)
    assert optimizer.decay_rate == decay_rate
    actual = apply_steps(optimizer, param, grads[:2])
    rho = 1.0 - 2.0 ** -decay_rate
    expected_v = rho * grads[0].astype(np.float64) ** 2 + (1 - rho) * grads[1].astype(np.float64) ** 2
    np.testing.assert_allclose(ops.convert_to_numpy(optimizer._v[0].value), expected_v, rtol=1e-6)
    reference, _ = reference_adafactor(param, grads[:2], [0.3, 0.3], None, decay_rate=decay_rate)
    np.testing.assert_allclose(actual[-1], reference[-1], rtol=1e-6, atol=1e-7)
    if decay_rate != 0.8:
        other, _ = reference_adafactor(param, grads[:2], [0.3, 0.3], None)
        assert np.abs(other[-1] - reference[-1]).max() > 1e-5


def test_base_lr_scales_both_optimizers():
    adafactor = make_optimizer(TrainConfig(warmup=0, adafactor=AdafactorConfig(base_lr=2.0)))
    assert adafactor._learning_rate.base_lr == 2.0 and adafactor._learning_rate.value_at(0) == pytest.approx(0.02)
    adam = make_optimizer(TrainConfig(optimizer="adam", warmup=0, adam=AdamConfig(base_lr=0.1)))
    assert adam._learning_rate.value_at(0) == pytest.approx(0.1 * 0.01)


def test_optimizer_defaults_are_meliads():
    assert AdafactorConfig() == AdafactorConfig(base_lr=1.0, beta1=0.9, decay_rate=0.8)
    assert AdamConfig() == AdamConfig(base_lr=0.05, beta1=0.9, beta2=0.98, weight_decay=0.0)
    recipe = validate_recipe({"train": {"adam": {"weight_decay": 1e-4}, "adafactor": {"beta1": None}}})
    assert recipe.train.adam.weight_decay == 1e-4 and recipe.train.adafactor.beta1 is None
    assert recipe.to_dict()["train"]["adafactor"] == {"base_lr": 1.0, "beta1": None, "decay_rate": 0.8,
                                                       "min_scale": 0.001, "small_size": 0, "small_lr_multiplier": 1.0}


@pytest.mark.parametrize("section,key,value,expected", [
    ("adam", "weight_decay", -1.0, "train.adam.weight_decay: got -1.0, expected a non-negative number"),
    ("adam", "beta1", 1.0, "train.adam.beta1: got 1.0, expected a number in [0, 1)"),
    ("adam", "beta2", -0.5, "train.adam.beta2: got -0.5, expected a number in [0, 1)"),
    ("adam", "base_lr", 0, "train.adam.base_lr: got 0.0, expected a positive number"),
    ("adafactor", "beta1", 1.5, "train.adafactor.beta1: got 1.5, expected a number in [0, 1)"),
    ("adafactor", "decay_rate", 1.2, "train.adafactor.decay_rate: got 1.2, expected a number in [0, 1]"),
    ("adafactor", "base_lr", -1, "train.adafactor.base_lr: got -1.0, expected a positive number"),
    ("adam", "weight_decay", "lots", "train.adam.weight_decay: got 'lots', expected a number"),
    ("adam", "decay", 0.1, "train.adam.decay: unknown key"),
])
def test_bad_optimizer_keys_stop_with_one_line(section, key, value, expected):
    with pytest.raises(RecipeError) as caught:
        validate_recipe({"train": {section: {key: value}}})
    message = str(caught.value)
    assert message.startswith(expected) and "\n" not in message, message
