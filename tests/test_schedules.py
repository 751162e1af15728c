"""MeliadSchedule against spec §10.2's reference table and each schedule's formula."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from meliad_core.config import LearningRateConfig, RecipeError, validate_recipe
from meliad_core.schedules import MeliadSchedule


def tensor_value(schedule, step, dtype="int32"):
    return float(ops.convert_to_numpy(schedule(ops.convert_to_tensor(step, dtype=dtype))))


def both_values(schedule, step):
    """The schedule's value at `step` from the tensor path and from value_at; they must agree."""
    fast, slow = tensor_value(schedule, step), schedule.value_at(step)
    assert fast == pytest.approx(slow, rel=1e-5, abs=1e-9)
    return slow


# spec §10.2, warmup 1000: (t, cosine T=500k, cosine T=250k, rsqrt_std), values as printed there.
TABLE = [
    (0, "0", "0", "0"),
    (500, "0.0050", "0.0050", "0.0158"),
    (1000, "0.0100", "0.0100", "0.0316"),
    (125_000, "0.00868", "0.0055", "0.00283"),
    (250_000, "0.0055", "0.0010", "0.0020"),
    (500_000, "0.0010", "0.0005", "0.00141"),
]


def assert_printed(actual, printed):
    """`actual` equals `printed` to the precision it is printed with (half a unit in the last digit)."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    assert abs(actual - float(printed)) <= 0.5 * 10.0 ** -decimals + 1e-12, (actual, printed)


@pytest.mark.parametrize("t,cos500,cos250,rsqrt_std", TABLE)
def test_reference_table(t, cos500, cos250, rsqrt_std):
    cosine_500k = MeliadSchedule(LearningRateConfig(schedule="cosine"), warmup=1000, total_steps=500_000)
    cosine_250k = MeliadSchedule(LearningRateConfig(schedule="cosine", max_steps=250_000), 1000, 500_000)
    standard = MeliadSchedule(LearningRateConfig(schedule="rsqrt_std"), warmup=1000, total_steps=500_000)
    assert_printed(both_values(cosine_500k, t), cos500)
    assert_printed(both_values(cosine_250k, t), cos250)
    assert_printed(both_values(standard, t), rsqrt_std)


def test_lr_is_zero_at_step_zero_with_warmup():
    for name in ("cosine", "rsqrt", "rsqrt_std", "linear", "exponential", "constant"):
        schedule = MeliadSchedule(LearningRateConfig(schedule=name), warmup=100, total_steps=1000)
        assert both_values(schedule, 0) == 0.0


def test_cosine_formula_and_halving():
    config = LearningRateConfig(schedule="cosine", max=0.02, min=0.002)
    schedule = MeliadSchedule(config, warmup=10, total_steps=1000)
    for t in (10, 100, 333, 999, 1000):
        expected = 0.002 + 0.018 * 0.5 * (1 + math.cos(math.pi * t / 1000))
        assert both_values(schedule, t) == pytest.approx(expected, rel=1e-5)
    # After T it halves every further T, continuing from min at T.
    for t in (1001, 1500, 2000, 3000):
        assert both_values(schedule, t) == pytest.approx(2 * 0.002 * 0.5 ** (t / 1000), rel=1e-5)
    assert both_values(schedule, 2000) == pytest.approx(0.001, rel=1e-5)
    # During warmup the schedule's clock is held at `warmup` and the ramp is linear.
    at_warmup = 0.002 + 0.018 * 0.5 * (1 + math.cos(math.pi * 10 / 1000))
    assert both_values(schedule, 4) == pytest.approx(0.4 * at_warmup, rel=1e-5)


def test_cosine_spike():
    config = LearningRateConfig(schedule="cosine", spike_steps=10_000, spike_lr=0.04)
    schedule = MeliadSchedule(config, warmup=1000, total_steps=500_000)
    assert both_values(schedule, 1000) == pytest.approx(0.04 * 9000 / 10_000, rel=1e-5)
    assert both_values(schedule, 5000) == pytest.approx(0.04 * 5000 / 10_000, rel=1e-5)
    assert both_values(schedule, 500) == pytest.approx(0.5 * 0.036, rel=1e-5)
    plain = MeliadSchedule(LearningRateConfig(schedule="cosine"), warmup=1000, total_steps=500_000)
    for t in (10_000, 20_000, 600_000):  # the spike has died out
        assert both_values(schedule, t) == pytest.approx(plain.value_at(t), rel=1e-6)


def test_linear_formula():
    schedule = MeliadSchedule(LearningRateConfig(schedule="linear"), warmup=0, total_steps=500_000)
    assert both_values(schedule, 0) == pytest.approx(0.01, rel=1e-6)
    assert both_values(schedule, 250_000) == pytest.approx(0.0055, rel=1e-5)
    assert both_values(schedule, 500_000) == pytest.approx(0.001, rel=1e-5)
    assert both_values(schedule, 1_000_000) == pytest.approx(0.0005, rel=1e-5)


def test_rsqrt_formula():
    config = LearningRateConfig(schedule="rsqrt", max=0.05, min=0.001)
    schedule = MeliadSchedule(config, warmup=1000, total_steps=500_000)
    assert both_values(schedule, 1000) == pytest.approx(0.001 / math.sqrt(1000 / 500_000), rel=1e-5)
    assert both_values(schedule, 250_000) == pytest.approx(0.001 * math.sqrt(2), rel=1e-5)
    assert both_values(schedule, 2_000_000) == pytest.approx(0.0005, rel=1e-5)
    # Clipped by max where min/√(t'/T) would exceed it (t' floored at 100).
    no_warmup = MeliadSchedule(config, warmup=0, total_steps=500_000)
    assert both_values(no_warmup, 0) == pytest.approx(0.05, rel=1e-6)
    assert both_values(no_warmup, 150) == pytest.approx(0.05, rel=1e-6)


def test_rsqrt_std_ignores_max_and_min():
    config = LearningRateConfig(schedule="rsqrt_std", max=0.001, min=0.5)
    schedule = MeliadSchedule(config, warmup=0, total_steps=10)
    assert both_values(schedule, 0) == pytest.approx(0.1, rel=1e-6)  # 1/√max(t, 100)
    assert both_values(schedule, 50) == pytest.approx(0.1, rel=1e-6)
    assert both_values(schedule, 400) == pytest.approx(0.05, rel=1e-6)


def test_constant_and_multiplier():
    config = LearningRateConfig(schedule="constant", max=0.3, multiplier=2.0)
    schedule = MeliadSchedule(config, warmup=4, total_steps=10)
    assert [round(both_values(schedule, t), 6) for t in (0, 1, 2, 4, 1000)] == [0.0, 0.15, 0.3, 0.6, 0.6]
    halved = MeliadSchedule(LearningRateConfig(multiplier=0.5), warmup=1000, total_steps=250_000)
    assert both_values(halved, 125_000) == pytest.approx(0.5 * 0.0055, rel=1e-5)


def test_base_lr_scales_everything():
    schedule = MeliadSchedule(LearningRateConfig(), warmup=0, total_steps=100, base_lr=0.05)
    assert both_values(schedule, 0) == pytest.approx(0.05 * 0.01, rel=1e-6)


def test_warmup_zero():
    schedule = MeliadSchedule(LearningRateConfig(schedule="cosine"), warmup=0, total_steps=100)
    assert both_values(schedule, 0) == pytest.approx(0.01, rel=1e-6)
    assert both_values(schedule, 50) == pytest.approx(0.0055, rel=1e-5)


def test_accepts_int64_and_float_steps():
    schedule = MeliadSchedule(LearningRateConfig(), warmup=1000, total_steps=500_000)
    if keras.backend.backend() != "jax":  # JAX has no int64 without x64 mode; its step is int32
        assert tensor_value(schedule, 500, "int64") == pytest.approx(0.005, rel=1e-5)
    assert tensor_value(schedule, 500.0, "float32") == pytest.approx(0.005, rel=1e-5)
    assert float(ops.convert_to_numpy(schedule(500))) == pytest.approx(0.005, rel=1e-5)


def test_serialization_round_trip():
    config = LearningRateConfig(schedule="cosine", max_steps=250_000, spike_steps=10, spike_lr=0.04,
                                multiplier=2.0)
    schedule = MeliadSchedule(config, warmup=1000, total_steps=500_000, base_lr=0.05)
    again = MeliadSchedule.from_config(schedule.get_config())
    assert again.config == config and again.warmup == 1000 and again.total_steps == 500_000
    assert again.base_lr == 0.05
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert isinstance(restored, MeliadSchedule)
    for t in (0, 500, 125_000, 400_000):
        assert restored.value_at(t) == schedule.value_at(t)


def test_max_steps_zero_is_finite():
    schedule = MeliadSchedule(LearningRateConfig(), warmup=0, total_steps=0)
    assert np.isfinite(both_values(schedule, 0)) and np.isfinite(both_values(schedule, 5))


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule"):
        MeliadSchedule(LearningRateConfig(schedule="step_decay"), warmup=0, total_steps=10)


# ---------------------------------------------------------------------------------------------
# exponential: meliad's optimizer_config.lr_exponential_decay, lr = max·(min/max)^(t/T), no floor.


def test_exponential_values_by_hand():
    config = LearningRateConfig(schedule="exponential", max=0.02, min=0.002)
    schedule = MeliadSchedule(config, warmup=0, total_steps=1000)
    # (min/max) = 0.1, so lr = 0.02 · 0.1^(t/1000).
    assert both_values(schedule, 0) == pytest.approx(0.02, rel=1e-6)
    assert both_values(schedule, 500) == pytest.approx(0.0063245553, rel=1e-6)   # 0.02/√10
    assert both_values(schedule, 250) == pytest.approx(0.0112468265, rel=1e-6)   # 0.02·10^-0.25
    assert both_values(schedule, 1000) == pytest.approx(0.002, rel=1e-5)         # min at T
    assert both_values(schedule, 1500) == pytest.approx(0.00063245553, rel=1e-5)  # no floor at min
    assert both_values(schedule, 2000) == pytest.approx(0.0002, rel=1e-5)         # another factor 10


def test_exponential_with_warmup_max_steps_and_multiplier():
    config = LearningRateConfig(schedule="exponential", max=0.01, min=0.001, max_steps=2000, multiplier=2.0)
    schedule = MeliadSchedule(config, warmup=100, total_steps=999, base_lr=0.05)
    at_warmup = 0.01 * 0.1 ** (100 / 2000)  # the clock is held at warmup during it
    assert both_values(schedule, 0) == 0.0
    assert both_values(schedule, 25) == pytest.approx(0.25 * at_warmup * 0.05 * 2.0, rel=1e-6)
    assert both_values(schedule, 100) == pytest.approx(at_warmup * 0.1, rel=1e-6)
    assert both_values(schedule, 2000) == pytest.approx(0.001 * 0.1, rel=1e-5)  # T from max_steps, not 999


def test_cosine_and_linear_tails_are_exponential_from_twice_min():
    """meliad's decay_after: lr_exponential_decay(max = 2·min, min) past T."""
    tail = MeliadSchedule(LearningRateConfig(schedule="exponential", max=0.004, min=0.002), 10, 1000)
    for name in ("cosine", "linear"):
        schedule = MeliadSchedule(LearningRateConfig(schedule=name, max=0.03, min=0.002), 10, 1000)
        for t in (1001, 1700, 4000):
            assert both_values(schedule, t) == pytest.approx(tail.value_at(t), rel=1e-6)


def test_exponential_needs_positive_max_and_min():
    for max_lr, min_lr in ((0.01, 0.0), (0.0, 0.001), (0.01, -0.001)):
        with pytest.raises(ValueError, match="exponential"):
            MeliadSchedule(LearningRateConfig(schedule="exponential", max=max_lr, min=min_lr), 0, 10)


def test_exponential_serialization_round_trip():
    schedule = MeliadSchedule(LearningRateConfig(schedule="exponential", max=0.05, min=0.0001), 10, 300)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    for t in (0, 5, 150, 300, 900):
        assert restored.value_at(t) == schedule.value_at(t)


def test_exponential_option_recipe():
    from meliad_core import plugins, recipes

    plugins.set_plugin_manager(None)
    try:
        lr = recipes.load_recipe("options/lr_exponential_decay").train.learning_rate
    finally:
        plugins.set_plugin_manager(None)
    assert (lr.schedule, lr.max, lr.min) == ("exponential", 0.01, 0.001)


@pytest.mark.parametrize("lr,expected", [
    ({"schedule": "exponential", "min": 0.0},
     "train.learning_rate.min: got 0.0, expected a positive number"),
    ({"schedule": "exponential", "max": 0.001, "min": 0.01},
     "train.learning_rate.max: got 0.001, expected more than train.learning_rate.min (0.01) for the exponential"),
    ({"schedule": "cosine", "max": 0.001, "min": 0.001},
     "train.learning_rate.max: got 0.001, expected more than train.learning_rate.min (0.001) for the cosine"),
    ({"schedule": "cosine", "spike_steps": 100, "spike_lr": 0.005},
     "train.learning_rate.spike_lr: got 0.005, expected more than train.learning_rate.max (0.01)"),
    ({"max_steps": 0}, "train.learning_rate.max_steps: got 0, expected a positive number"),
    ({"multiplier": -2}, "train.learning_rate.multiplier: got -2.0, expected a non-negative number"),
    ({"schedule": "exponentail"}, "train.learning_rate.schedule: got 'exponentail', expected one of"),
])
def test_bad_schedule_keys_stop_with_one_line(lr, expected):
    with pytest.raises(RecipeError) as caught:
        validate_recipe({"train": {"learning_rate": lr}})
    message = str(caught.value)
    assert message.startswith(expected) and "\n" not in message, message


def test_schedules_that_ignore_min_accept_any_order():
    for name in ("constant", "rsqrt_std"):
        recipe = validate_recipe({"train": {"learning_rate": {"schedule": name, "max": 0.001, "min": 0.5}}})
        assert recipe.train.learning_rate.schedule == name
