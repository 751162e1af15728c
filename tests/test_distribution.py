"""Data-parallel training over simulated devices (JAX on CPU): the same numbers as one device, every
stream's state sharded by batch row, never replicated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meliad_core.config import RecipeError, validate_recipe
from meliad_core.distribution import make_distribution
from model_helpers import tiny_recipe

HERE = Path(__file__).parent
ON_JAX = os.environ.get("KERAS_BACKEND") == "jax"


@pytest.mark.skipif(not ON_JAX, reason="multi-device training is JAX's (the jax env runs it)")
@pytest.mark.parametrize("arch", ["xl", "memory", "recurrent"])
def test_eight_devices_train_like_one_with_state_sharded_by_row(arch):
    proc = subprocess.run([sys.executable, str(HERE / "distributed_run.py"), arch, "8", "20"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    one, many = result["one"], result["many"]
    for key, value in one["metrics"].items():
        assert abs(many["metrics"][key] - value) <= 1e-5 * max(abs(value), 1e-6), (key, value, many["metrics"][key])
    assert one["moved"] > 1e-3 and abs(many["moved"] - one["moved"]) <= 1e-4 * one["moved"]  # weights trained
    for key, shards in many["state"].items():  # each device holds exactly its 1/8 of every state variable
        assert len(shards) == 8 and all(shape[0] == 1 for shape in shards), (key, shards)
        assert all(shape[1:] == one["state"][key][0][1:] for shape in shards)
    for path, shards in many["weights"].items():  # weights replicated
        assert all(shape == one["weights"][path][0] for shape in shards), path


def test_distribution_is_validated_and_refused_off_jax():
    with pytest.raises(RecipeError, match=r"distribution.devices: got 3, expected a divisor of data.batch_size \(8\)"):
        validate_recipe(tiny_recipe("xl", batch_size=8, distribution={"devices": 3}))
    with pytest.raises(RecipeError, match="distribution.kind: got 'pipeline', expected one of data_parallel"):
        validate_recipe(tiny_recipe("xl", batch_size=8, distribution={"kind": "pipeline"}))
    recipe = validate_recipe(tiny_recipe("xl", batch_size=8, distribution={}))
    assert recipe.distribution.devices is None and make_distribution(None, 8) is None
    if not ON_JAX:
        with pytest.raises(RecipeError, match="distribution: got data_parallel, which needs the jax backend"):
            make_distribution(recipe.distribution, 8)
    else:
        import keras

        available = len(keras.distribution.list_devices())
        with pytest.raises(RecipeError, match=f"but JAX sees {available} device"):
            make_distribution(validate_recipe(tiny_recipe("xl", batch_size=8 * available * 2,
                                                          distribution={"devices": 2 * available})).distribution,
                              8 * available * 2)


@pytest.mark.skipif(not ON_JAX, reason="multi-device training is JAX's (the jax env runs it)")
def test_scale_benchmark_prints_state_shrinking_per_device():
    script = HERE.parent / "benchmarks" / "scale.py"
    proc = subprocess.run([sys.executable, str(script), "--arch", "xl", "--devices", "1", "2", "--steps", "1",
                           "--batch-size", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "devices" not in line]
    (one, two) = [[cell.strip() for cell in row] for row in rows]
    assert one[0] == "1" and two[0] == "2"
    assert float(two[2]) * 2 == pytest.approx(float(one[2])) and float(two[3]) == pytest.approx(float(one[3]))
