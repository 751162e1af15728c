"""Data-parallel training over simulated devices (JAX on CPU): the same numbers as one device, every
stream's state sharded by batch row, never replicated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meliad_core.cli import run_cli
from meliad_core.config import RecipeError, validate_recipe
from meliad_core.distribution import make_distribution
from model_helpers import tiny_recipe

HERE = Path(__file__).parent
ON_JAX = os.environ.get("KERAS_BACKEND") == "jax"


def distributed_like_one(*args: str) -> tuple[dict, dict]:
    """Runs tests/distributed_run.py ARCH DEVICES STEPS [MODEL_AXIS]; asserts the many-device run trained
    with the one-device metrics (1e-5 relative) and weight movement; returns both runs' records."""
    proc = subprocess.run([sys.executable, str(HERE / "distributed_run.py"), *args],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    one, many = result["one"], result["many"]
    for key, value in one["metrics"].items():
        assert abs(many["metrics"][key] - value) <= 1e-5 * max(abs(value), 1e-6), (key, value, many["metrics"][key])
    assert one["moved"] > 1e-3 and abs(many["moved"] - one["moved"]) <= 1e-4 * one["moved"]  # weights trained
    return one, many


@pytest.mark.skipif(not ON_JAX, reason="multi-device training is JAX's (the jax env runs it)")
@pytest.mark.parametrize("arch", ["xl", "memory", "recurrent"])
def test_eight_devices_train_like_one_with_state_sharded_by_row(arch):
    one, many = distributed_like_one(arch, "8", "20")
    for key, shards in many["state"].items():  # each device holds exactly its 1/8 of every state variable
        assert len(shards) == 8 and all(shape[0] == 1 for shape in shards), (key, shards)
        assert all(shape[1:] == one["state"][key][0][1:] for shape in shards)
    for path, shards in many["weights"].items():  # weights replicated
        assert all(shape == one["weights"][path][0] for shape in shards), path


# model_parallel: the weights model.py names, and the axis of each that is split over the 'model' axis
SPLIT = {"embedding": 1, "queries": 1, "queries2": 1, "keys": 1, "values": 1, "ffn_hidden": 1, "post_attn": 0,
         "ffn_output": 0}


@pytest.mark.skipif(not ON_JAX, reason="multi-device training is JAX's (the jax env runs it)")
def test_model_parallel_trains_like_one_device_with_weights_split():
    """8 devices as 4 batch x 2 model: the big weights are split in two, the state by batch row (2 rows per
    replica), and the numbers are those of one device."""
    one, many = distributed_like_one("recurrent", "8", "10", "2")
    split = 0
    for path, shards in many["weights"].items():
        full = one["weights"][path][0]
        axis = SPLIT.get(path.rsplit("/", 1)[-1])
        expected = list(full)
        if axis is not None:
            expected[axis] //= 2
            split += 1
        assert len(shards) == 8 and all(shape == expected for shape in shards), (path, shards, expected)
    assert split >= 12  # embedding + 2 layers' projections and FFN (and the recurrent cell's)
    slots = 0  # Adafactor's momentum of each split weight is split like it
    for path, shards in many["weights"].items():
        momentum = [s for name, s in many["slots"].items() if name.endswith(path.replace("/", "_") + "_m")]
        if path.rsplit("/", 1)[-1] in SPLIT:
            assert len(momentum) == 1 and momentum[0] == shards, (path, momentum, shards)
            slots += 1
    assert slots == split
    for key, shards in many["state"].items():  # 4 replicas of 2 rows each; the model axis holds copies
        assert len(shards) == 8 and all(shape[0] == 2 and shape[1:] == one["state"][key][0][1:] for shape in shards)


def test_model_parallel_is_validated():
    with pytest.raises(RecipeError, match=r"distribution.model_axis: got 3, expected a divisor of model.embed_dim"):
        validate_recipe(tiny_recipe("xl", batch_size=8, distribution={"kind": "model_parallel", "model_axis": 3}))
    with pytest.raises(RecipeError, match="distribution.model_axis: got None, expected the number of devices"):
        validate_recipe(tiny_recipe("xl", batch_size=8, distribution={"kind": "model_parallel"}))
    with pytest.raises(RecipeError, match="distribution.model_axis: got 2, which needs distribution.kind: model_par"):
        validate_recipe(tiny_recipe("xl", batch_size=8, distribution={"model_axis": 2}))
    with pytest.raises(RecipeError, match=r"distribution.devices: 6 devices make 3 model replicas of 2, expected a "
                                          r"divisor of data.batch_size \(8\)"):
        validate_recipe(tiny_recipe("xl", batch_size=8, distribution={"kind": "model_parallel", "model_axis": 2,
                                                                      "devices": 6}))


def test_distribution_is_refused_off_jax_by_meliad_run(capsys, tmp_path):
    """torch and TensorFlow train on one device: `meliad run --devices` stops with one line, writes nothing."""
    if ON_JAX:
        pytest.skip("the jax backend trains on several devices")
    backend = os.environ.get("KERAS_BACKEND")
    status = run_cli(["run", "transformer_xl_tiny", "--backend", backend, "--workdir", str(tmp_path / "w"),
                      "--devices", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert f"distribution: got data_parallel, which needs the jax backend; on {backend} meliad trains on one " \
           "device" in err[0]
    assert not (tmp_path / "w").exists()


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
    assert float(one[4]) > 0 and float(two[4]) == pytest.approx(float(one[4]))  # data parallel: weights replicated


@pytest.mark.skipif(not ON_JAX, reason="multi-device training is JAX's (the jax env runs it)")
def test_run_on_four_devices_resumes_on_two_like_one_device(tmp_path):
    """meliad run --devices: a checkpoint written on 4 devices resumes on 2 and ends as a 1-device run."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("include: transformer_xl_tiny\ndata: {batch_size: 4}\n"
                      "train: {steps: 4, checkpoint_every: 2, log_every: 1, warmup: 1}\neval: {every: 100, steps: 1}\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "KERAS_BACKEND": "jax"}

    def meliad(*args):
        proc = subprocess.run([sys.executable, "-m", "meliad_core.cli", "run", str(recipe), "--backend", "jax", *args],
                              capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    assert "data parallel over 4 devices" in meliad("--workdir", "a", "--devices", "4")
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step_4")  # as if stopped after step 2
    assert "resuming from" in meliad("--workdir", "a", "--devices", "2")
    meliad("--workdir", "b")

    def rows(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return {(r["step"], r["split"]): r for r in map(json.loads, lines)}

    resumed, single = rows("a"), rows("b")
    assert sorted(resumed) == sorted(single)
    for key, row in single.items():
        assert resumed[key]["bits_per_token"] == pytest.approx(row["bits_per_token"], rel=1e-5), key


def test_devices_option_sets_only_the_device_count(capsys, tmp_path):
    """`--devices all` keeps the recipe's (here --set's) other distribution keys: the model_parallel kind and
    its axis are still checked (and 3 does not divide the embedding's 128)."""
    status = run_cli(["run", "transformer_xl_tiny", "--backend", os.environ.get("KERAS_BACKEND", "jax"),
                      "--workdir", str(tmp_path / "w"), "--set", "distribution.kind=model_parallel",
                      "--set", "distribution.model_axis=3", "--devices", "all"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert "distribution.model_axis: got 3, expected a divisor of model.embed_dim (128)" in err[0]
