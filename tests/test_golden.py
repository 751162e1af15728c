"""One golden file, three backends: the same weights give the same logits and carried state everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model_helpers import make_model, to_numpy

GOLDEN = np.load(Path(__file__).parent / "golden" / "golden.npz")
CASES = sorted({key.split("/")[0] for key in GOLDEN.files if "/" in key})


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Relative to the size of the expected values, 1e-5 (float32 across frameworks)."""
    assert actual.shape == expected.shape, what
    if expected.dtype.kind in "iub":
        np.testing.assert_array_equal(actual, expected, err_msg=what)
        return
    scale = max(float(np.abs(expected).max()), 1e-6)
    error = float(np.abs(actual.astype(np.float64) - expected).max()) / scale
    assert error <= 1e-5, f"{what}: relative error {error:.2e}"


def test_golden_covers_every_architecture():
    assert {"xl", "memorizing_bucketed", "recurrent_fixed_skip"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_matches_golden(case):
    recipe = json.loads(str(GOLDEN[f"{case}/recipe"]))
    model = make_model(recipe, streams=("predict",))
    prefix = f"{case}/weight/"
    weights = {key[len(prefix):]: GOLDEN[key] for key in GOLDEN.files if key.startswith(prefix)}
    assert sorted(weights) == sorted(v.path for v in model.trainable_weights)
    for var in model.trainable_weights:
        var.assign(weights[var.path])
    tokens, starts = GOLDEN[f"{case}/tokens"], GOLDEN[f"{case}/starts"]
    for i in range(len(starts)):
        logits = to_numpy(model({"tokens": tokens[i], "start_of_sequence": starts[i]}))
        assert_close(logits, GOLDEN[f"{case}/logits/{i}"], f"{case} segment {i} logits")
        for key, value in model.get_stream_state("predict").items():
            assert_close(value, GOLDEN[f"{case}/state/{i}/{key}"], f"{case} segment {i} state {key}")
