"""The benchmark scripts run end to end at their tiniest settings and print their table."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from meliad_core.config import validate_recipe

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
BACKEND = keras.backend.backend()
TINY_MODEL = ["--set", "model.num_layers=2", "--set", "model.embed_dim=16", "--set", "model.num_heads=2",
              "--set", "model.head_dim=8", "--set", "model.mlp_dim=32"]


def bench(script: str, *args: str) -> str:
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--backend", BACKEND, *args], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def table(out: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the markdown table a benchmark prints."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert len(lines) >= 3 and set(lines[1]) <= {"|", "-"}, out
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], [row for row in cells[2:]]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scaling_prints_a_table():
    out = bench("scaling.py", "--segment-lengths", "32", "--window", "16", "--memory-sizes", "64",
                "--memory-segment-length", "32", "--neighbors", "16", "--steps", "1", "--min-tokens", "1",
                "--intervals", "1", "--warmup", "1", *TINY_MODEL)
    assert out.startswith("command: python benchmarks/scaling.py --backend")
    assert "machine: " in out
    header, rows = table(out)
    assert header[:2] == ["part", "configuration"] and "us/token" in header and "peak MiB" in header
    assert [(r[0], r[1]) for r in rows] == [("segment", "N=32, W=16"), ("memory", "M=64, N=W=32, k=16")]
    for row in rows:
        assert not any(cell.startswith("failed") for cell in row), row
        assert row[2] == BACKEND and float(row[header.index("ms/step")]) > 0
    assert rows[0][header.index("vs first")] == "1.00x"


def test_long_range_prints_a_table(tmp_path):
    out = bench("long_range.py", "--recipes", "inline", "--steps", "2", "--eval-batches", "2", "--segment-length", "32",
                "--window", "16", "--batch-size", "2", "--memory-size", "128", "--neighbors", "16", "--states", "8",
                "--workdir", str(tmp_path), *TINY_MODEL)
    assert out.startswith("command: python benchmarks/long_range.py --backend")
    assert "machine: " in out and "recipes: inline" in out
    header, rows = table(out)
    assert header[0] == "model" and "tokens/s" in header and "rest bits/tok" in header
    assert [r[0] for r in rows] == ["xl", "memorizing", "recurrent"]
    for row in rows:
        assert not any(cell.startswith("failed") for cell in row), row
        assert row[header.index("steps")] == "2" and float(row[header.index("bits/tok")]) > 0
        assert (tmp_path / row[0] / "report" / "long_range.json").is_file()


def test_long_range_recipes_are_valid():
    """The inline recipes at their default sizes (and the bundled ones, where present) validate."""
    module = load_script("long_range")
    args = module.argparse.Namespace(segment_length=128, window=64, batch_size=4, memory_size=2048, neighbors=32,
                                     states=64, steps=500, sets=[])
    sources = ["inline"] + (["bundled"] if module.bundled_available() else [])
    for source in sources:
        for model in module.MODELS:
            recipe = validate_recipe(module.recipe_mapping(model, args, source))
            assert recipe.train.steps == 500 and recipe.eval.steps == 0
            assert (recipe.memory is not None) == (model == "memorizing")
            assert (recipe.recurrence is not None) == (model == "recurrent")


@pytest.mark.parametrize("part, values", [("segment", [128, 256, 512, 1024, 2048]),
                                          ("memory", [1024, 4096, 16384, 32768])])
def test_scaling_default_configurations_are_valid(part, values):
    from meliad_core.recipes import apply_override, resolve_recipe_mapping

    module = load_script("scaling")
    for value in values:
        mapping = resolve_recipe_mapping("sizes/tiny_test")
        for text in module.overrides_for(part, value, window=128, memory_segment_length=256, neighbors=128):
            mapping = apply_override(mapping, text)
        validate_recipe(mapping)
