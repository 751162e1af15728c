"""`meliad run` with a host memory store, killed with SIGKILL and resumed, ends bit-identical (issue 13).

The memory of a host store lives outside the model's variables (`meliad_core.host_store`); a checkpoint
carries it as `host/...` arrays. Here a tiny memorizing run with `memory.store: exact_host` runs in
subprocesses under `meliad run` (test_faults.py's children and comparison): killed inside its second
checkpoint write, then at a random moment after a checkpoint, then run to the end. Every checkpoint
(weights, optimizer state, data position, host memory) and every metrics row must equal those of an
uninterrupted run, and the host memory in them must be real (written, wrapped around, per stream).
"""

from __future__ import annotations

import random
import signal
import subprocess

import numpy as np
import yaml

from meliad_core import checkpoint as ckpt
from test_faults import assert_same_run, child, child_env, fault_recipe, kill_at_random

STORE = "exact_host"
SIZE, SEGMENT = 64, 32  # the memory holds two segments: it wraps around within the run
KILL_PLAN = ["checkpoint:2", "random"]  # inside the second checkpoint write; then after a metrics row


def host_recipe(steps: int = 12) -> dict:
    recipe = fault_recipe(steps=steps)
    recipe["name"] = "host_store_faults"
    recipe["memory"] = {"layers": [-1], "size": SIZE, "neighbors": 4, "store": STORE}
    recipe["attention"] = {"window": SEGMENT}
    return recipe


def test_kill_9_then_resume_with_a_host_store_is_bit_identical(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(host_recipe()))
    env = child_env(tmp_path / "compile_cache")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    done = child(recipe, straight, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err.decode()[-3000:]

    kills = 0
    for kill in KILL_PLAN:
        if kill == "random":
            assert ckpt.list_checkpoints(stopped)  # killed after a checkpoint
            kills += kill_at_random(recipe, stopped, env, random.Random(13))
            continue
        proc = child(recipe, stopped, env, kill, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == -signal.SIGKILL, f"{kill}: exit {proc.returncode}: {err.decode()[-3000:]}"
        kills += 1
    assert kills == len(KILL_PLAN)  # every kill landed inside the run
    last = child(recipe, stopped, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = last.communicate(timeout=600)
    assert last.returncode == 0, err.decode()[-3000:]
    assert "Traceback" not in err.decode()
    assert_same_run(straight, stopped)

    # the checkpoints hold the host memory itself: train rows wrapped around, the eval stream's own
    _, arrays = ckpt.read_checkpoint(ckpt.list_checkpoints(straight)[0])
    host = {key[len(ckpt.HOST_PREFIX):]: value for key, value in arrays.items() if key.startswith(ckpt.HOST_PREFIX)}
    counts = {key: value for key, value in host.items() if key.endswith("/train/count")}
    assert len(counts) == 1, sorted(host)
    (count_key, count), = counts.items()
    assert count.shape == (2,) and (count > SIZE).any()  # written past the memory's size: wrapped around
    keys = host[count_key.replace("/count", "/keys")]
    assert keys.shape[2] == SIZE and np.abs(keys).sum(axis=-1).all()  # every slot of every row written
    assert any(key.endswith("/eval/count") for key in host)
