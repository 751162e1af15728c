"""The workdir lock (issue 10): one run per workdir; a lock left by a dead run is taken over."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meliad_core import cli, plugins, runner
from meliad_core.config import validate_recipe

BACKEND = os.environ.get("KERAS_BACKEND") or "jax"
REPO = Path(__file__).resolve().parent.parent

HOLD = """
import sys, time
from meliad_core.runner import WorkdirLock
lock = WorkdirLock(sys.argv[1]).__enter__()
print("locked", flush=True)
time.sleep(300)
"""

RECIPE = {
    "name": "locked",
    "model": {"num_layers": 1, "embed_dim": 16, "num_heads": 2, "head_dim": 8, "mlp_dim": 32},
    "attention": {"window": 16},
    "data": {"segment_length": 32, "batch_size": 1,
             "options": {"num_documents": 2, "num_eval_documents": 1, "document_length": 200}},
    "train": {"steps": 1},
}


@pytest.fixture
def holder(tmp_path):
    """Another process that holds the lock of tmp_path/run until it is killed."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "locked"
    yield workdir, proc
    proc.kill()
    proc.wait()


def test_a_second_run_stops_with_one_line_naming_the_holder(holder, tmp_path, capsys, monkeypatch):
    workdir, proc = holder
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    monkeypatch.setenv("KERAS_BACKEND", BACKEND)
    plugins.set_plugin_manager(None)
    capsys.readouterr()
    status = cli.run_cli(["run", str(recipe), "--backend", BACKEND, "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert status == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("meliad: error: ") and f"in use by another meliad run (pid {proc.pid})" in err
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]  # nothing else was written


def test_a_stale_lock_is_taken_over_with_a_notice(holder, capsys):
    workdir, proc = holder
    proc.kill()  # kill -9: the kernel drops its lock, the file with its pid stays
    proc.wait()
    assert (workdir / ".lock").read_text().strip() == str(proc.pid)
    capsys.readouterr()
    with runner.WorkdirLock(workdir):
        err = capsys.readouterr().err
        assert err.startswith("meliad: notice: taking over the stale lock") and f"pid {proc.pid}" in err
        assert (workdir / ".lock").read_text().strip() == str(os.getpid())
    assert not (workdir / ".lock").exists()


def test_the_lock_is_exclusive_within_a_process_too(tmp_path):
    with runner.WorkdirLock(tmp_path):
        with pytest.raises(runner.RunFault, match=f"pid {os.getpid()}"):
            runner.run_training(validate_recipe(RECIPE), tmp_path)
        with pytest.raises(runner.RunFault, match="in use"):
            runner.WorkdirLock(tmp_path).__enter__()
    with runner.WorkdirLock(tmp_path):  # released: free again
        pass
