"""Writes tests/golden/golden.npz: weights, inputs, logits and carried state of tiny models of every
architecture over three segments, computed once (float32, dropout off) so that every backend can be
checked against the same numbers. Run from the repository root:

    KERAS_BACKEND=jax python tests/golden/make_golden.py

Regenerate only when the model's intended computation changes, and say why in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from model_helpers import make_model, randomize_weights, to_numpy, tiny_recipe  # noqa: E402

CASES = {
    "xl": tiny_recipe("xl"),
    "xl_nocache": tiny_recipe("xl", window=8, attention={"window": 8, "xl_cache": False}),
    "memorizing_bucketed": tiny_recipe("memory"),
    "memorizing_exact": tiny_recipe("memory", memory={"store": "exact"}),
    "recurrent_fixed_skip": tiny_recipe("recurrent"),
    "recurrent_lstm_dual": tiny_recipe("recurrent", recurrence={"gate": "lstm", "variant": "dual"}),
    "recurrent_lstm_single_feedback": tiny_recipe("recurrent", recurrence={"gate": "lstm", "variant": "single",
                                                                           "feedback": True}),
}
# segment starts per batch slot: slot 1 starts a new document at the third segment
STARTS = [[True, True], [False, False], [False, True]]


def main() -> None:
    import keras

    out: dict[str, np.ndarray] = {"backend": np.array(keras.backend.backend())}
    rng = np.random.default_rng(2022)
    for case, recipe in CASES.items():
        model = make_model(recipe, streams=("predict",))
        weights = randomize_weights(model, seed=len(case))
        n = recipe["data"]["segment_length"]
        tokens = rng.integers(1, recipe["model"]["vocab_size"], size=(len(STARTS), 2, n)).astype("int32")
        tokens[1, 0, -2:] = 0  # padding ids inside a segment
        out[f"{case}/recipe"] = np.array(json.dumps(recipe))
        out[f"{case}/tokens"] = tokens
        out[f"{case}/starts"] = np.array(STARTS)
        for path, value in weights.items():
            out[f"{case}/weight/{path}"] = value
        for i, starts in enumerate(STARTS):
            logits = model({"tokens": tokens[i], "start_of_sequence": np.array(starts)})
            out[f"{case}/logits/{i}"] = to_numpy(logits)
            for key, value in model.get_stream_state("predict").items():
                out[f"{case}/state/{i}/{key}"] = value
    np.savez_compressed(HERE / "golden.npz", **out)
    print(f"wrote {HERE / 'golden.npz'} with {len(CASES)} cases on {keras.backend.backend()}")


if __name__ == "__main__":
    main()
