"""Multi-host training (`meliad run --coordinator/--num-processes/--process-id`, jax.distributed): two
processes on localhost with 4 simulated CPU devices each train like one process on one device, only
process 0 writes, and its checkpoint (the state gathered from both hosts) resumes on a single process."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from meliad_core.cli import run_cli
from meliad_core.recipes import load_recipe
from meliad_core.runner import run_training

ON_JAX = os.environ.get("KERAS_BACKEND") == "jax"
BACKEND = os.environ.get("KERAS_BACKEND", "jax")

RECIPE = """include: transformer_xl_tiny
model: {num_layers: 2, embed_dim: 32, num_heads: 2, head_dim: 16, mlp_dim: 64}
attention: {window: 32}
data: {segment_length: 64, batch_size: 8, options: {num_documents: 16, num_eval_documents: 8, document_length: 400}}
train: {steps: 10, checkpoint_every: 5, log_every: 1, warmup: 2}
eval: {every: 5, steps: 1}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _rows(workdir: Path) -> dict:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {(r["step"], r["split"]): r for r in map(json.loads, lines)}


@pytest.mark.skipif(not ON_JAX, reason="multi-host training is JAX's (the jax env runs it)")
@pytest.mark.parametrize("assignment", ["round_robin", "first_free"])
def test_two_processes_train_like_one_and_resume_on_one(tmp_path, assignment):
    """round_robin: each host reads only its own slots and the positions are gathered; first_free: each
    host reads every slot. Either way the run is the single-process run."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("batch_size: 8,", f"batch_size: 8, assignment: {assignment},"))
    base = {**os.environ, "KERAS_BACKEND": "jax"}
    base.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "meliad_core.cli", "run", str(recipe), "--backend", "jax"]
    port = _free_port()
    hosts = [subprocess.Popen([*command, "--workdir", "multi", "--coordinator", f"localhost:{port}",
                               "--num-processes", "2", "--process-id", str(i)], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
             for i in range(2)]
    try:
        outputs = [host.communicate(timeout=400) for host in hosts]
    finally:
        for host in hosts:
            host.kill()
    for host, (out, err) in zip(hosts, outputs):
        assert host.returncode == 0, err[-3000:]
    assert "over 8 devices (8 batch) on 2 hosts" in outputs[0][0] and "done: 10 steps" in outputs[0][0]
    assert "step 10/10" not in outputs[1][0]  # process 1 neither logs nor writes
    assert ("every host reads every batch slot's documents" in outputs[0][1]) == (assignment == "first_free")

    def meliad(workdir: str) -> str:  # one process, one device: in this process
        out = io.StringIO()
        run_training(load_recipe(str(recipe)), tmp_path / workdir, out=out)
        return out.getvalue()

    meliad("single")
    multi, single = tmp_path / "multi", tmp_path / "single"
    assert sorted(_rows(multi)) == sorted(_rows(single))
    for key, row in _rows(single).items():
        for metric in ("bits_per_token", "accuracy"):
            assert _rows(multi)[key][metric] == pytest.approx(row[metric], rel=1e-5, abs=1e-7), (key, metric)
    # process 0's checkpoint holds both hosts' rows of every state variable, in order: it equals one process's
    for step in (5, 10):
        with np.load(multi / f"checkpoints/step_{step}/arrays.npz") as got, \
                np.load(single / f"checkpoints/step_{step}/arrays.npz") as want:
            assert sorted(got.files) == sorted(want.files)
            for key in want.files:
                scale = max(1.0, float(np.abs(want[key]).max()))
                assert np.abs(got[key].astype(np.float64) - want[key]).max() <= 1e-5 * scale, (step, key)
        # and every slot's data position, gathered from both hosts with round_robin
        manifests = [json.loads((run / f"checkpoints/step_{step}/manifest.json").read_text()) for run in (multi, single)]
        assert manifests[0]["data"] == manifests[1]["data"], step
        assert manifests[0]["accumulator"]["chars"] == manifests[1]["accumulator"]["chars"], step

    shutil.rmtree(multi / "checkpoints" / "step_10")  # as if stopped after step 5: resume on one process
    assert "resuming from" in meliad("multi")
    for key, row in _rows(single).items():
        assert _rows(multi)[key]["bits_per_token"] == pytest.approx(row["bits_per_token"], rel=1e-5), key


@pytest.mark.parametrize("args, expected", [
    (["--coordinator", "localhost:1234"], "--num-processes, --process-id: missing"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "--coordinator: got 'localhost', "
                                                                                  "expected HOST:PORT"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "--process-id: got 2, expected 0 to 1"),
    (["--multihost", "--process-id", "0"], "--multihost: expected either --multihost"),
])
def test_multihost_options_are_checked_with_one_line(args, expected, capsys, tmp_path):
    status = run_cli(["run", "transformer_xl_tiny", "--backend", "jax", "--workdir", str(tmp_path / "w"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "w").exists()


@pytest.mark.skipif(ON_JAX, reason="the other backends refuse a multi-host run")
def test_multihost_is_refused_off_jax(capsys, tmp_path):
    status = run_cli(["run", "transformer_xl_tiny", "--backend", BACKEND, "--workdir", str(tmp_path / "w"),
                      "--multihost"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "multi-host training needs the jax backend" in err[0], err
