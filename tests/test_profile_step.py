"""benchmarks/profile_step.py runs end to end at its tiniest settings and prints its table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras

BACKEND = keras.backend.backend()
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_step.py"
TINY = ["model.num_layers=2", "model.embed_dim=16", "model.num_heads=2", "model.head_dim=8", "model.mlp_dim=32",
        "data.segment_length=32", "attention.window=16"]


def test_profile_step_prints_a_table():
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "2",
           f"MELIAD_PYTHON_{BACKEND.upper()}": sys.executable}
    args = ["--backends", BACKEND, "--archs", "xl", "--parts", "attention", "--steps", "1",
            "--intervals", "1"] + [x for text in TINY for x in ("--set", text)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[:3] == ["backend", "arch", "step ms"] and row[:2] == [BACKEND, "xl"], proc.stdout
    assert float(row[2]) > 0 and "(" in row[header.index("attention")] and row[header.index("retrieval")] == "-"
