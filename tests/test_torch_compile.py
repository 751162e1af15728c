"""`train.compile: true` on torch: the steps run through torch.compile and compute what eager torch does.

The golden file's logits and carried state come out of the compiled predict step, and a compiled run
that stops after a checkpoint and resumes ends bit-identical to one that did not stop. Torch only
(on jax the step is always jitted and golden runs it; TensorFlow's XLA path is Keras' own).
Each test asserts that torch.compile really produced graphs (Dynamo falls back to eager silently).

Compiling costs minutes per model on a 2-core CPU (about 25 graph breaks), so the tox matrix runs the
XL golden case only; `MELIAD_SLOW_TESTS=1` also runs the memorizing and recurrent golden cases and the
compiled resume-equals-no-stop run (about 45 minutes on a busy 2-core machine; all pass).
"""

from __future__ import annotations

import json
import os
import shutil

import keras
import pytest

from meliad_core.config import validate_recipe
from meliad_core.model import compile_step
from meliad_core.runner import run_training
from model_helpers import make_model, to_numpy
from test_faults import assert_same_run
from test_golden import GOLDEN, assert_close
from test_training import run_recipe

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch.compile serves the torch backend")

SLOW = pytest.mark.skipif(os.environ.get("MELIAD_SLOW_TESTS") != "1",
                          reason="compiles for minutes: run with MELIAD_SLOW_TESTS=1")
# one case per architecture (each compiles its own step; the other cases differ only in options)
GOLDEN_CASES = ["xl", pytest.param("memorizing_bucketed", marks=SLOW), pytest.param("recurrent_fixed_skip", marks=SLOW)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own models: past Dynamo's recompile limit (models built earlier in the
    process) it would run them eagerly without a word."""
    import torch

    torch._dynamo.reset()
    yield


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    # graphs Dynamo actually built: counters["frames"] also counts frames whose conversion failed
    # (and that then ran eagerly), so it would not catch the silent fallback
    return counters["stats"]["unique_graphs"]


def test_train_compile_picks_keras_jit_compile():
    assert compile_step("torch", True) is True and compile_step("torch", False) is False
    assert compile_step("jax", False) is True  # always jitted
    assert compile_step("tensorflow", True) is True and compile_step("tensorflow", None) == "auto"
    model = make_model({**json.loads(str(GOLDEN["xl/recipe"])), "train": {"compile": True}}, streams=("predict",))
    model.compile()
    assert model.jit_compile is True
    model.compile(jit_compile=False)  # an explicit argument wins over the recipe
    assert model.jit_compile is False


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_compiled_predict_matches_golden(case):
    recipe = json.loads(str(GOLDEN[f"{case}/recipe"]))
    recipe["train"] = {"compile": True}
    model = make_model(recipe, streams=("predict",))
    model.compile()
    prefix = f"{case}/weight/"
    for var in model.trainable_weights:
        var.assign(GOLDEN[prefix + var.path])
    tokens, starts = GOLDEN[f"{case}/tokens"], GOLDEN[f"{case}/starts"]
    before = _graphs_compiled()
    for i in range(len(starts)):
        logits = to_numpy(model.predict_on_batch({"tokens": tokens[i], "start_of_sequence": starts[i]}))
        assert_close(logits, GOLDEN[f"{case}/logits/{i}"], f"{case} segment {i} logits (compiled)")
        for key, value in model.get_stream_state("predict").items():
            assert_close(value, GOLDEN[f"{case}/state/{i}/{key}"], f"{case} segment {i} state {key} (compiled)")
    assert _graphs_compiled() > before, "torch.compile produced no graph"


@SLOW
def test_compiled_run_resumed_after_a_stop_equals_one_without(tmp_path):
    """Dropout on, 4 steps, a checkpoint at 2: the run stopped after step 2 (its newer files removed,
    as a kill leaves them) resumes to the same checkpoints and metrics rows, bit for bit."""
    recipe = validate_recipe(run_recipe(steps=4, checkpoint_every=2, compile=True) | {"eval": {"every": 4, "steps": 1}})
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    before = _graphs_compiled()
    run_training(recipe, straight)
    assert _graphs_compiled() > before, "torch.compile produced no graph"
    shutil.copytree(straight, stopped)
    shutil.rmtree(stopped / "checkpoints" / "step_4")
    run_training(recipe, stopped)
    assert_same_run(straight, stopped)
