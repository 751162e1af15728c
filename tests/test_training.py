"""Training runs: metrics, checkpoints, resume equals no stop, damaged checkpoints, --load-dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from meliad_core import checkpoint as ckpt
from meliad_core.config import validate_recipe
from meliad_core.runner import RUN_STREAMS, RunError, run_training

BACKEND = keras.backend.backend()
REQUIRED_KEYS = {"step", "split", "nats_per_token", "bits_per_token", "bits_per_char", "accuracy", "learning_rate",
                 "tokens_per_second"}


def run_recipe(steps: int = 12, **train) -> dict:
    return {
        "name": "tiny_run",
        "model": {"num_layers": 2, "embed_dim": 32, "num_heads": 2, "head_dim": 16, "mlp_dim": 64,
                  "dropout": 0.1, "attn_dropout": 0.1},
        "attention": {"window": 16},
        "data": {"segment_length": 32, "batch_size": 2,
                 "options": {"num_documents": 8, "num_eval_documents": 4, "document_length": 1500}},
        "train": {"steps": steps, "warmup": 4, "checkpoint_every": 4, "log_every": 2, **train},
        "eval": {"every": 4, "steps": 2},
    }


def _lines(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        record.pop("tokens_per_second")
    return records


def test_run_writes_metrics_and_checkpoints(tmp_path, capsys):
    summary = run_training(validate_recipe(run_recipe(steps=8)), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "eval"}
    assert all(REQUIRED_KEYS <= set(r) for r in records)
    assert [r["step"] for r in records if r["split"] == "eval"] == [4, 8]
    assert all(np.isfinite(r["bits_per_token"]) and r["bits_per_token"] > 0 for r in records)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_8", "step_4"]
    assert summary["step"] == 8
    out = capsys.readouterr().out
    assert "step 8/8" in out and out.strip().splitlines()[-1].startswith("done: 8 steps")
    # the same workdir again: nothing left to do, nothing lost
    run_training(validate_recipe(run_recipe(steps=8)), tmp_path)
    assert "nothing to do" in capsys.readouterr().out
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == len(records)


def test_resume_refuses_a_different_recipe(tmp_path):
    run_training(validate_recipe(run_recipe(steps=4)), tmp_path)
    with pytest.raises(RunError, match="model.embed_dim: 32 -> 64"):
        changed = run_recipe(steps=4)
        changed["model"]["embed_dim"] = 64
        run_training(validate_recipe(changed), tmp_path)


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, capsys):
    run_training(validate_recipe(run_recipe(steps=8)), tmp_path)
    newest = tmp_path / "checkpoints" / "step_8" / "arrays.npz"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a half-written file
    (tmp_path / "checkpoints" / ".tmp_step_12_999").mkdir()  # a temporary left by a killed writer
    path, manifest, _ = ckpt.latest_valid_checkpoint(tmp_path, warn=print)
    assert path.name == "step_4" and manifest["step"] == 4
    assert "SHA-256" in capsys.readouterr().out
    summary = run_training(validate_recipe(run_recipe(steps=8)), tmp_path)  # resumes from step 4
    assert summary["step"] == 8 and summary["train"] is not None


def test_load_dir_starts_a_new_run_from_weights(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run_training(validate_recipe(run_recipe(steps=4)), first)
    _, manifest, arrays = ckpt.latest_valid_checkpoint(first)
    run_training(validate_recipe(run_recipe(steps=1, checkpoint_every=1)), second, load_dir=first)
    records = _lines(second / "metrics.jsonl")
    assert records[0]["step"] == 1
    fresh = tmp_path / "fresh"
    run_training(validate_recipe(run_recipe(steps=1, checkpoint_every=1)), fresh)
    # starting from trained weights, the first step's loss differs from a fresh start's
    assert records[0]["nats_per_token"] != _lines(fresh / "metrics.jsonl")[0]["nats_per_token"]
    with pytest.raises(RunError, match="no intact checkpoint"):
        run_training(validate_recipe(run_recipe(steps=1)), tmp_path / "third", load_dir=tmp_path / "missing")


def _cli(recipe_path: Path, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "meliad_core.cli", "run", str(recipe_path), "--backend", BACKEND,
            "--workdir", str(workdir)]


def test_resume_after_kill_equals_no_stop(tmp_path):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(run_recipe(steps=12)))
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "PYTHONUNBUFFERED": "1"}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    subprocess.run(_cli(recipe_path, straight), env=env, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_cli(recipe_path, stopped), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (stopped / "checkpoints" / "step_4").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    killed_mid_run = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed_mid_run, "the run finished before it could be killed; make it longer"
    assert not (stopped / "checkpoints" / "step_12").exists()
    subprocess.run(_cli(recipe_path, stopped), env=env, check=True, capture_output=True, timeout=600)

    _, m1, a1 = ckpt.latest_valid_checkpoint(straight)
    _, m2, a2 = ckpt.latest_valid_checkpoint(stopped)
    assert m1["step"] == m2["step"] == 12
    assert m1["data"] == m2["data"]
    for key in a1:
        np.testing.assert_array_equal(a1[key], a2[key], err_msg=key)  # bit-exact on every backend
    assert _lines(straight / "metrics.jsonl") == _lines(stopped / "metrics.jsonl")


def test_checkpoint_written_on_jax_loads_here(tmp_path):
    """A checkpoint moves between backends: the JAX fixture gives the same logits and keeps training."""
    from meliad_core.model import build_model
    from meliad_core.optimizers import make_optimizer
    from golden.make_checkpoint_fixture import FIXTURE, fixed_input

    recipe = validate_recipe(run_recipe(steps=2, checkpoint_every=2))
    manifest, arrays = ckpt.read_checkpoint(FIXTURE)
    assert manifest["backend"] == "jax"
    model = build_model(recipe, vocab_size=259, streams=RUN_STREAMS)
    optimizer = make_optimizer(recipe.train, recipe.train.steps)
    model.compile(optimizer=optimizer)
    optimizer.build(model.trainable_variables)
    ckpt.restore(model, optimizer, manifest, arrays)
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 2
    expected = np.load(FIXTURE.parent / "checkpoint_jax_logits.npy")
    model.reset_state("eval")
    with model.inference_stream("eval"):
        logits = keras.ops.convert_to_numpy(model(fixed_input(2, 32)))
    assert float(np.abs(logits - expected).max()) <= 1e-5 * float(np.abs(expected).max())
    train_state = model.get_stream_state("train")
    assert any(v.any() for v in train_state.values())  # the train stream's caches came along
    logs = model.train_on_batch(fixed_input(2, 32), return_dict=True)
    assert np.isfinite(logs["loss"])


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed in this environment")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_training(validate_recipe(run_recipe(steps=4)), tmp_path)
    train = EventAccumulator(str(tmp_path / "tensorboard" / "train"))
    train.Reload()
    assert [e.step for e in train.Scalars("bits_per_token")] == [2, 4]
    evals = EventAccumulator(str(tmp_path / "tensorboard" / "eval"))
    evals.Reload()
    assert [e.step for e in evals.Scalars("bits_per_token")] == [4]
