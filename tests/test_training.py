"""Training runs: metrics, checkpoints, resume equals no stop, damaged checkpoints, --load-dir."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import yaml

from meliad_core import checkpoint as ckpt
from meliad_core.config import validate_recipe
from meliad_core.runner import RUN_STREAMS, RunError, run_training
from model_helpers import metrics_rows

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
    records = metrics_rows(second / "metrics.jsonl")
    assert records[0]["step"] == 1
    fresh = tmp_path / "fresh"
    run_training(validate_recipe(run_recipe(steps=1, checkpoint_every=1)), fresh)
    # starting from trained weights, the first step's loss differs from a fresh start's
    assert records[0]["nats_per_token"] != metrics_rows(fresh / "metrics.jsonl")[0]["nats_per_token"]
    with pytest.raises(RunError, match="no intact checkpoint"):
        run_training(validate_recipe(run_recipe(steps=1)), tmp_path / "third", load_dir=tmp_path / "missing")


# A kill -9 at any moment (and its exact resume) is tested in test_faults.py, ten times on JAX.

jax_only = pytest.mark.skipif(BACKEND != "jax", reason="slow: runs on the jax environment only")


def _meliad(capsys, *args: str) -> tuple[int, str, str]:
    from meliad_core import cli, plugins

    plugins.set_plugin_manager(None)
    capsys.readouterr()
    status = cli.run_cli(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@jax_only
def test_extending_a_finished_run(tmp_path, capsys, monkeypatch):
    """README's "train longer (--set train.steps=N)": the same recipe with more steps continues the run;
    so does `meliad run WORKDIR --extend K`. The learning-rate schedule keeps its original length."""
    from meliad_core.config import LearningRateConfig
    from meliad_core.schedules import MeliadSchedule

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_BACKEND", BACKEND)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(run_recipe(steps=6)))
    workdir = tmp_path / "runs" / "tiny_run"  # the default: runs/<recipe name>
    assert _meliad(capsys, "run", str(recipe), "--backend", BACKEND)[0] == 0
    first = metrics_rows(workdir / "metrics.jsonl")

    status, out, err = _meliad(capsys, "run", str(recipe), "--backend", BACKEND, "--set", "train.steps=8")
    assert status == 0, err
    assert "extending the run" in out and "keeps its length of 6 steps" in out
    rows = metrics_rows(workdir / "metrics.jsonl")
    assert rows[:len(first)] == first and [r["step"] for r in rows[len(first):]] == [8, 8]
    schedule = MeliadSchedule(LearningRateConfig(), warmup=4, total_steps=6)
    assert rows[-1]["learning_rate"] == pytest.approx(schedule.value_at(8))

    # a workdir written before keys existed (here: model.mlp_activation) resumes; --extend counts from the
    # run's own train.steps
    for path in [workdir / "recipe.yaml", *sorted((workdir / "checkpoints").glob("step_*/manifest.json"))]:
        if path.suffix == ".json":
            manifest = json.loads(path.read_text())
            del manifest["recipe"]["model"]["mlp_activation"]
            path.write_text(json.dumps(manifest))
        else:
            saved = yaml.safe_load(path.read_text())
            del saved["model"]["mlp_activation"]
            path.write_text(yaml.safe_dump(saved))
    status, out, err = _meliad(capsys, "run", str(workdir), "--backend", BACKEND, "--extend", "2")
    assert status == 0, err
    assert [r["step"] for r in metrics_rows(workdir / "metrics.jsonl")][-2:] == [10, 10]
    assert yaml.safe_load((workdir / "recipe.yaml").read_text())["train"]["steps"] == 10
    _, manifest, _ = ckpt.latest_valid_checkpoint(workdir)
    assert manifest["step"] == 10 and manifest["schedule_steps"] == 6
    assert not (workdir / ".lock").exists()

    # fewer steps than done: nothing to do, nothing written
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    status, out, err = _meliad(capsys, "run", str(workdir), "--backend", BACKEND, "--set", "train.steps=7")
    assert status == 0 and "nothing to do: the run is already at step 10" in out, err
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before
    # anything else that changes: one line, exit 2
    status, _, err = _meliad(capsys, "run", str(workdir), "--backend", BACKEND, "--set", "model.embed_dim=64")
    assert status == 2 and len(err.splitlines()) == 1 and "model.embed_dim: 32 -> 64" in err
    status, _, err = _meliad(capsys, "run", str(recipe), "--backend", BACKEND, "--workdir", str(tmp_path / "new"),
                             "--extend", "2")
    assert status == 2 and "holds no checkpoint of a run to extend" in err


def test_a_recipe_from_before_new_keys_is_the_same_recipe():
    """Keys that a stored recipe lacks count as their defaults; any other value is a difference."""
    from meliad_core.runner import _first_difference

    current = validate_recipe({**run_recipe(), "memory": {"layers": [-1], "size": 64, "neighbors": 8},
                               "attention": {"window": 32}}).to_dict()
    saved = json.loads(json.dumps(current))
    del saved["model"]["mlp_activation"], saved["memory"]["query_stride"], saved["attention"]["options"]
    assert _first_difference(saved, current) is None
    changed = validate_recipe({**run_recipe(), "memory": {"layers": [-1], "size": 64, "neighbors": 8,
                                                          "query_stride": 2},
                               "attention": {"window": 32}}).to_dict()
    assert _first_difference(saved, changed) == "memory.query_stride: None -> 2"
    assert _first_difference(saved, {**current, "train": {**current["train"], "steps": 99}}) == \
        "train.steps: 12 -> 99"
    assert _first_difference(saved, {**current, "train": {**current["train"], "steps": 99}},
                             allowed=("train.steps",)) is None


def test_a_v01_recipe_with_moved_position_keys_resumes():
    """v0.1 stored model.position_buckets/max_distance; they now live in the t5 plugin's options."""
    from meliad_core.config import migrate_stored_recipe
    from meliad_core.runner import _first_difference

    current = validate_recipe(run_recipe()).to_dict()
    old = json.loads(json.dumps(current))
    old["model"].update(position_buckets=32, position_max_distance=128)
    stored = json.loads(json.dumps(old))
    assert _first_difference(migrate_stored_recipe(old), current) is None
    assert old == stored  # the stored recipe itself is left alone
    old["model"]["position_buckets"] = 16
    assert _first_difference(migrate_stored_recipe(old), current) == \
        "model.position_options.num_buckets: 16 -> None"


def test_every_reader_of_a_stored_recipe_migrates_it():
    """`checkpoint.stored_recipe` (report, eval, generate, the probes) reads a v0.1 manifest as a resumed
    run does, moved keys moved; a manifest without a valid recipe is one CheckpointError line."""
    old = validate_recipe(run_recipe()).to_dict()
    old["model"].update(position_buckets=16, position_max_distance=128)
    with pytest.raises(ValueError, match="model.position_buckets: this key moved"):
        validate_recipe(old)  # what the readers did before: the report of a v0.1 run failed
    recipe = ckpt.stored_recipe("step_2", {"recipe": old})
    assert recipe.model.position_options == {"num_buckets": 16}
    with pytest.raises(ckpt.CheckpointError, match=r"^step_2: the checkpoint's manifest holds no recipe$"):
        ckpt.stored_recipe("step_2", {"step": 2})
    with pytest.raises(ckpt.CheckpointError, match=r"^step_2: the checkpoint's recipe is not valid here \(train.steps"):
        ckpt.stored_recipe("step_2", {"recipe": {**old, "train": {**old["train"], "steps": -1}}})


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
