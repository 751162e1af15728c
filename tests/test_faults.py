"""Faults during a run (issue 10): kill -9 anywhere, full disks, blocked folders, damaged files, out of
memory. Each ends with one line and a non-zero exit, loses nothing, and the next run resumes exactly.

The kill test runs `meliad run` in subprocesses and kills them with SIGKILL at random moments and at
chosen points (inside a checkpoint write, inside a metrics append); after every kill the run is
started again on the same workdir, and the chain ends bit-identical to an uninterrupted run: every
checkpoint's arrays and every metrics row. The in-process tests that train are marked `slow` and run
on the jax environment only; the others run everywhere.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from meliad_core import checkpoint as ckpt
from meliad_core import cli, plugins, runner
from meliad_core.config import validate_recipe
from model_helpers import metrics_rows
from test_training import run_recipe

BACKEND = keras.backend.backend()
jax_only = pytest.mark.skipif(BACKEND != "jax", reason="slow: runs on the jax environment only")
REPO = Path(__file__).resolve().parent.parent


def fault_recipe(steps: int = 6, **train) -> dict:
    """test_training's tiny run with checkpoints every 3 steps, all kept, and a one-batch eval."""
    recipe = run_recipe(steps, **{"warmup": 2, "checkpoint_every": 3, "keep_checkpoints": 100, **train})
    return {**recipe, "name": "faults", "eval": {"every": 4, "steps": 1}}


def same_manifest(a: dict, b: dict) -> bool:
    def strip(m: dict) -> dict:
        m = {k: v for k, v in m.items() if k != "created"}
        for kind in ("model_variables", "optimizer_variables"):  # seed generators are numbered per process
            m[kind] = [{**v, "name": ckpt._plain_name(v["name"])} for v in m[kind]]
        if "accumulator" in m:  # wall-clock sums only feed tokens_per_second
            m["accumulator"] = {k: v for k, v in m["accumulator"].items() if k not in ("seconds", "processed")}
        return m

    return strip(a) == strip(b)


def assert_same_run(straight: Path, other: Path) -> None:
    """Every checkpoint bit-identical (arrays and manifest) and every metrics row equal."""
    names = [p.name for p in ckpt.list_checkpoints(straight)]
    assert names == [p.name for p in ckpt.list_checkpoints(other)]
    for name in names:
        m1, a1 = ckpt.read_checkpoint(straight / "checkpoints" / name)
        m2, a2 = ckpt.read_checkpoint(other / "checkpoints" / name)
        assert same_manifest(m1, m2), name
        assert a1.keys() == a2.keys()
        for key in a1:
            np.testing.assert_array_equal(a1[key], a2[key], err_msg=f"{name} {key}")
    assert metrics_rows(straight / "metrics.jsonl") == metrics_rows(other / "metrics.jsonl")
    assert not [p for p in (other / "checkpoints").iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------
# kill -9


CHILD = r"""
import json, os, signal, sys
where, _, count = os.environ.get("MELIAD_TEST_KILL", "").partition(":")
count = int(count or 0)
calls = [0]

def due():
    calls[0] += 1
    return calls[0] == count

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if where == "checkpoint":  # inside a checkpoint write: arrays.npz half written, not renamed
    import numpy as np
    savez = np.savez
    def half_savez(file, *args, **kwargs):
        savez(file, *args, **kwargs)
        if due():
            file.flush(); file.truncate(file.tell() // 2); file.flush(); die()
    np.savez = half_savez
elif where == "rename":  # a complete temporary checkpoint folder, killed just before its rename
    replace = os.replace
    def killing_replace(src, dst, *args, **kwargs):
        if os.path.basename(str(src)).startswith(".tmp_step_") and due():
            die()
        return replace(src, dst, *args, **kwargs)
    os.replace = killing_replace
elif where == "metrics":  # inside a metrics append: half a row written
    from meliad_core import runner
    write = runner.MetricsLog.write
    def half_write(self, record):
        if due():
            data = (json.dumps(record) + "\n").encode()
            self._file.write(data[: len(data) // 2]); self._file.flush(); die()
        return write(self, record)
    runner.MetricsLog.write = half_write
from meliad_core.cli import main
main()
"""

# deterministic kill points, then random moments; the other backends take the first two
KILL_PLAN = ["checkpoint:1", "metrics:2", "random", "rename:1", "metrics:1", "random", "checkpoint:2", "random",
             "metrics:4", "random"]
KILLS = len(KILL_PLAN) if BACKEND == "jax" else 2


def child_env(cache: Path) -> dict:
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MELIAD_TEST_KILL", None)
    if BACKEND == "jax":  # compiled steps are reused by every process of the chain (same executables)
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def child(recipe: Path, workdir: Path, env: dict, kill: str = "", **popen) -> subprocess.Popen:
    env = {**env, "MELIAD_TEST_KILL": kill} if kill else env
    return subprocess.Popen([sys.executable, "-c", CHILD, "run", str(recipe), "--backend", BACKEND, "--workdir",
                             str(workdir)], env=env, cwd=REPO, **popen)


def kill_at_random(recipe: Path, workdir: Path, env: dict, rng: random.Random) -> bool:
    """Starts a run and kills it a random number of metrics rows (and milliseconds) later."""
    metrics = workdir / "metrics.jsonl"

    def count() -> int:
        try:
            return metrics.read_bytes().count(b"\n")
        except OSError:
            return 0

    target = count() + rng.randint(1, 4)
    proc = child(recipe, workdir, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and count() < target and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.03))
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return killed


def test_kill_9_anywhere_then_resume_is_bit_identical(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(fault_recipe(steps=48)))
    env = child_env(tmp_path / "compile_cache")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    done = child(recipe, straight, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = done.communicate(timeout=600)
    assert done.returncode == 0, err.decode()[-3000:]

    rng = random.Random(10)
    kills = 0
    for kill in KILL_PLAN[:KILLS]:
        if kill == "random":
            kills += kill_at_random(recipe, stopped, env, rng)
            continue
        proc = child(recipe, stopped, env, kill, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == -signal.SIGKILL, f"{kill}: exit {proc.returncode}: {err.decode()[-3000:]}"
        kills += 1
        if kill.startswith("metrics"):  # the cut-short row is there, as a kill leaves it
            assert not (stopped / "metrics.jsonl").read_bytes().endswith(b"\n")
        if kill.startswith(("checkpoint", "rename")):
            assert [p for p in (stopped / "checkpoints").iterdir() if p.name.startswith(".tmp_step_")]
    assert kills >= min(KILLS, 10)  # every kill landed inside the run
    last = child(recipe, stopped, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = last.communicate(timeout=600)
    assert last.returncode == 0, err.decode()[-3000:]
    assert "Traceback" not in err.decode()
    assert_same_run(straight, stopped)
    if (straight / "tensorboard").exists():  # the events a killed run wrote after its checkpoint are purged
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        for split in ("train", "eval"):
            curves = []
            for workdir in (straight, stopped):
                events = EventAccumulator(str(workdir / "tensorboard" / split))
                events.Reload()
                curves.append([(e.step, e.value) for e in events.Scalars("bits_per_token")])
            assert curves[0] == curves[1], split


# ----------------------------------------------------------------------------------------------
# metrics.jsonl, without training


def test_a_row_cut_short_and_rows_after_the_checkpoint_are_dropped(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    full = [{"step": s, "split": "train", "x": s / 3} for s in (2, 4, 6, 8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in full) + '{"step": 10, "spl')
    kept = runner.read_metrics(path, start_step=6)
    assert kept == full[:3]
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in full[:3])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("meliad: notice: ") and "cut short" in err[0]
    assert runner.read_metrics(path) == full[:3]  # reading alone changes nothing


def test_a_damaged_row_elsewhere_is_not_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    text = '{"step": 2, "split": "train"}\nnot json\n{"step": 4, "split": "train"}\n'
    path.write_text(text)
    with pytest.raises(runner.RunFault, match=r"metrics.jsonl:2: a damaged row"):
        runner.read_metrics(path, start_step=4)
    assert path.read_text() == text


def test_an_append_that_fails_leaves_no_half_row(tmp_path):
    log = runner.MetricsLog(tmp_path / "metrics.jsonl", start_step=0)
    log.write({"step": 1, "split": "train"})

    class FullDisk:  # writes part of the row, then the disk is full
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:5])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    log._file = FullDisk(log._file)
    with pytest.raises(OSError):
        log.write({"step": 2, "split": "train"})
    log._file = log._file.f
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "split": "train"}\n'


# ----------------------------------------------------------------------------------------------
# messages


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34359738368 bytes."), "32.0 GiB"),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.35 GiB total capacity)"), "20.00 GiB"),
    (RuntimeError("OOM when allocating tensor with shape[4096,4096,1024] and type float on /device:GPU:0"),
     "shape [4096,4096,1024]"),
    (MemoryError("Unable to allocate 7.28 TiB for an array with shape (1000000, 1000000) and data type float64"),
     "7.28 TiB"),
    (MemoryError(), "an allocation did not fit"),
])
def test_out_of_memory_names_the_size(error, expected):
    message = runner.out_of_memory_message(error)
    assert message.startswith("out of memory: ") and expected in message and "data.batch_size" in message
    assert runner.out_of_memory_message(ValueError("shapes do not match")) is None


def test_os_errors_are_one_line_with_a_hint():
    message = runner.describe_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/metrics.jsonl"))
    assert message.startswith("/runs/x/metrics.jsonl: No space left on device") and "free some space" in message


class _FakeXlaRuntimeError(RuntimeError):
    pass


@pytest.fixture
def bad_build(monkeypatch):
    """Makes building the model raise the given exception (nothing is trained)."""
    import meliad_core.model

    def install(exc: BaseException):
        def build(*args, **kwargs):
            raise exc
        monkeypatch.setattr(meliad_core.model, "build_model", build)
    monkeypatch.setenv("KERAS_BACKEND", BACKEND)
    monkeypatch.delenv("MELIAD_DEBUG", raising=False)
    plugins.set_plugin_manager(None)
    yield install
    plugins.set_plugin_manager(None)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = cli.run_cli(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_out_of_memory_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, bad_build, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(fault_recipe()))
    bad_build(_FakeXlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68719476736 bytes."))
    status, _, err = _cli(capsys, "run", str(recipe), "--backend", BACKEND, "--workdir", str(tmp_path / "w"))
    assert status == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("meliad: error: out of memory: 64.0 GiB did not fit while building the model")
    assert not (tmp_path / "w").exists()  # nothing was written, so nothing is left behind
    for debug in (["--debug"], []):
        if not debug:
            monkeypatch.setenv("MELIAD_DEBUG", "1")
        status, _, err = _cli(capsys, "run", str(recipe), "--backend", BACKEND, "--workdir", str(tmp_path / "w"),
                              *debug)
        assert status == 1 and "Traceback" in err and "_FakeXlaRuntimeError" in err
        assert err.splitlines()[-1].startswith("meliad: error: out of memory")


def test_an_unexpected_error_is_one_line(tmp_path, capsys, bad_build):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(fault_recipe()))
    bad_build(TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'"))
    status, _, err = _cli(capsys, "run", str(recipe), "--backend", BACKEND, "--workdir", str(tmp_path / "w"))
    assert status == 1 and len(err.splitlines()) == 1, err
    assert "internal error: TypeError: unsupported operand" in err and "--debug" in err


def test_blocked_files_stop_before_a_model_is_built(tmp_path, capsys, bad_build):
    """A folder where metrics.jsonl or recipe.yaml go, a file where checkpoints/ goes, a read-only folder:
    one line, exit 1, before anything is built (building would raise here)."""
    bad_build(AssertionError("the model must not be built"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(fault_recipe()))
    cases = {"metrics.jsonl": "is a folder", "recipe.yaml": "is a folder", "checkpoints": "is a file"}
    for name, message in cases.items():
        workdir = tmp_path / f"blocked_{name}"
        workdir.mkdir()
        (workdir / name).mkdir() if name != "checkpoints" else (workdir / name).write_text("x")
        status, _, err = _cli(capsys, "run", str(recipe), "--backend", BACKEND, "--workdir", str(workdir))
        assert status == 1 and len(err.splitlines()) == 1 and message in err and name in err, err
        assert not (workdir / ".lock").exists()
    real_access = os.access
    workdir = tmp_path / "read_only"
    workdir.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner.os, "access", lambda path, mode: Path(path) != workdir and real_access(path, mode))
        status, _, err = _cli(capsys, "run", str(recipe), "--backend", BACKEND, "--workdir", str(workdir))
    assert status == 1 and len(err.splitlines()) == 1 and "not writable" in err, err
    # a workdir that is a file, and an empty one
    (tmp_path / "a_file").write_text("x")
    status, _, err = _cli(capsys, "run", str(recipe), "--backend", BACKEND, "--workdir", str(tmp_path / "a_file"))
    assert status == 2 and "is a file" in err


def test_unreadable_data_is_one_line(tmp_path, capsys):
    """A data file that cannot be read (EIO from /proc/self/mem) stops `run` and `recipe show` alike."""
    if not Path("/proc/self/mem").exists():
        pytest.skip("needs /proc/self/mem")
    (tmp_path / "eval.txt").symlink_to("/proc/self/mem")
    recipe = fault_recipe()
    recipe["data"] = {"source": "text_files", "segment_length": 32, "batch_size": 2,
                      "options": {"paths": "/proc/self/mem", "eval_paths": str(tmp_path / "eval.txt")}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    plugins.set_plugin_manager(None)
    for args in (["run", str(path), "--backend", BACKEND, "--workdir", str(tmp_path / "w")],
                 ["recipe", "show", str(path)]):
        status, out, err = _cli(capsys, *args)
        assert status == 1 and len(err.splitlines()) == 1, err
        assert "cannot read the train data of data.source 'text_files'" in err and "Input/output error" in err
    assert not (tmp_path / "w").exists()


def test_python_warnings_are_one_line(tmp_path, capsys, monkeypatch):
    text = tmp_path / "book.txt"
    text.write_text("a small book\n" * 50)
    recipe = fault_recipe()
    recipe["data"] = {"source": "text_files", "segment_length": 32, "batch_size": 1, "options": {"paths": str(text)}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.setenv("KERAS_BACKEND", BACKEND)
    status, out, err = _cli(capsys, "recipe", "show", str(path))
    assert status == 0, err
    warnings = err.splitlines()
    assert warnings and all(w.startswith("meliad: warning: ") for w in warnings), err
    assert ".py:" not in err


# ----------------------------------------------------------------------------------------------
# In-process runs (slow: jax only)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """An uninterrupted 6-step run: checkpoints at 3 and 6, train rows at 2, 4, 6, eval rows at 4, 6."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    runner.run_training(validate_recipe(fault_recipe()), workdir, out=io.StringIO())
    return workdir


def _copy(trained: Path, target: Path) -> Path:
    shutil.copytree(trained, target)
    return target


def test_a_checkpoint_write_that_fails_removes_its_temporary_folder(tmp_path, monkeypatch):
    """A full disk (or a read-only folder) in the middle of a write: the error is raised, the temporary
    folder is gone and the older checkpoints are as they were."""
    model = types.SimpleNamespace(variables=[keras.Variable(np.arange(6.0).reshape(2, 3), name="w")])
    optimizer = types.SimpleNamespace(variables=[keras.Variable(np.ones(3), name="m")])
    ckpt.save_checkpoint(tmp_path, 3, model, optimizer, extra={})
    before = (tmp_path / "checkpoints" / "step_3" / "arrays.npz").read_bytes()
    for code in (errno.ENOSPC, errno.EROFS):
        def failing_savez(file, **arrays):
            file.write(b"PK\x03\x04 partial")
            raise OSError(code, os.strerror(code), file.name)

        monkeypatch.setattr(ckpt.np, "savez", failing_savez)
        with pytest.raises(OSError):
            ckpt.save_checkpoint(tmp_path, 6, model, optimizer, extra={}, keep=1)
        assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_3"]
        assert (tmp_path / "checkpoints" / "step_3" / "arrays.npz").read_bytes() == before


def test_a_damaged_newest_checkpoint_is_replaced_and_the_intact_one_survives(tmp_path):
    model = types.SimpleNamespace(variables=[keras.Variable(np.zeros(4), name="w")])
    optimizer = types.SimpleNamespace(variables=[])
    for step in (3, 6, 9):
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, extra={}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_9", "step_6"]
    (tmp_path / "checkpoints" / "step_9" / "arrays.npz").write_bytes(b"damaged")
    # resumed from step 6, the run writes step 7 with keep=1: step 9 (later, damaged) is not counted as
    # one to keep, so step 7 survives; then step 9 is written over the damaged folder
    ckpt.save_checkpoint(tmp_path, 7, model, optimizer, extra={}, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_9", "step_7"]
    assert ckpt.latest_valid_checkpoint(tmp_path, warn=lambda m: None)[0].name == "step_7"
    ckpt.save_checkpoint(tmp_path, 9, model, optimizer, extra={}, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_9"]
    assert ckpt.read_checkpoint(tmp_path / "checkpoints" / "step_9")
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.pop("data"), "no 'data' key"),
    (lambda m: m.pop("recipe"), "no 'recipe' key"),
    (lambda m: m.pop("model_variables"), "'model_variables' key is missing"),
    (lambda m: m.update(step="x"), "step is 'x'"),
    (lambda m: m.update(step=5), "not the folder's step"),
    (lambda m: m["model_variables"].append({"name": "extra", "shape": [1]}), "no model variable 1"),
])
def test_damaged_manifests_are_skipped_with_a_warning(tmp_path, damage, message):
    model = types.SimpleNamespace(variables=[keras.Variable(np.zeros(4), name="w")])
    optimizer = types.SimpleNamespace(variables=[])
    for step in (3, 6):
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, extra={"recipe": {}, "data": {"train": {}, "eval": {}}})
    path = tmp_path / "checkpoints" / "step_6" / "manifest.json"
    manifest = json.loads(path.read_text())
    damage(manifest)
    path.write_text(json.dumps(manifest))
    warnings = []
    found = ckpt.latest_valid_checkpoint(tmp_path, warn=warnings.append, check=runner._check_manifest)
    assert found[0].name == "step_3"
    assert len(warnings) == 1 and message in warnings[0], warnings


@jax_only
def test_disk_full_during_a_run_is_one_line_and_the_next_run_resumes(trained, tmp_path, monkeypatch, capsys):
    recipe = validate_recipe(fault_recipe())
    workdir = tmp_path / "run"
    real_savez = np.savez

    def full_at_step_6(file, **arrays):
        if "/.tmp_step_6_" in str(getattr(file, "name", "")):
            file.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), file.name)
        return real_savez(file, **arrays)

    monkeypatch.setattr(ckpt.np, "savez", full_at_step_6)
    with pytest.raises(runner.RunFault, match="cannot write the checkpoint of step 6: .*No space left on device.*"
                                              "the newest intact checkpoint \\(step_3\\) is kept") as raised:
        runner.run_training(recipe, workdir, out=io.StringIO())
    assert len(str(raised.value).splitlines()) == 1 and raised.value.exit_code == 1
    monkeypatch.setattr(ckpt.np, "savez", real_savez)
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == ["step_3"]  # no temporary folder left
    assert [r["step"] for r in metrics_rows(workdir / "metrics.jsonl")][-1] == 6  # rows after the checkpoint: dropped later

    # the next run resumes from step 3 and finishes exactly as the uninterrupted run did: its row of
    # step 4 averages steps 3 and 4, the running sums since the row of step 2 being in the checkpoint
    manifest = json.loads((workdir / "checkpoints" / "step_3" / "manifest.json").read_text())
    assert manifest["accumulator"]["steps"] == 1 and manifest["accumulator"]["tokens"] > 0
    capsys.readouterr()
    runner.run_training(recipe, workdir, out=io.StringIO())
    assert_same_run(trained, workdir)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "notice" not in err  # the rows after step 3 were whole: dropped silently


@jax_only
def test_no_intact_checkpoint_stops_and_restart_keeps_the_old_files(trained, tmp_path, capsys, monkeypatch):
    workdir = _copy(trained, tmp_path / "run")
    for folder in ckpt.list_checkpoints(workdir):
        (folder / "manifest.json").write_text('{"format": "meliad.checkpoint/1", "step": 3')
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    monkeypatch.setenv("KERAS_BACKEND", BACKEND)
    status, out, err = _cli(capsys, "run", str(workdir), "--backend", BACKEND)
    lines = err.splitlines()
    assert status == 1 and lines[-1].startswith("meliad: error: ") and "none of its 2 checkpoint" in lines[-1]
    assert len(lines) == 3 and all(line.startswith("meliad: warning: skipping checkpoint") for line in lines[:-1])
    assert "skipping" not in out  # checkpoint warnings go to stderr
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before  # nothing truncated

    # --restart: the old files move aside, nothing is lost, and the run starts again
    status, _, err = _cli(capsys, "run", str(workdir), "--backend", BACKEND, "--restart")
    assert status == 0, err
    previous = [p for p in workdir.iterdir() if p.name.startswith("previous_")]
    assert len(previous) == 1 and (previous[0] / "metrics.jsonl").read_bytes() == before[workdir / "metrics.jsonl"]
    assert "--restart: moved the previous run's" in err
    assert_same_run(trained, workdir)
