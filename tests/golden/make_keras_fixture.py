"""Writes tests/golden/model_jax.keras (a saved MeliadLM of every mechanism, after one segment, so its
carried state is not zero) and model_jax_next.npz (the next segment and its logits), for the test that
a model saved on JAX loads on every backend. Run from the repository root:

    KERAS_BACKEND=jax python tests/golden/make_keras_fixture.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from model_helpers import make_model, randomize_weights, tiny_recipe, to_numpy  # noqa: E402

# block feedback: a recurrent layer and a layer that reads its state; memory in the other layer
RECIPE = tiny_recipe("recurrent", model={"num_layers": 3}, attention={"window": 8},
                     recurrence={"layers": [1], "gate": "lstm", "variant": "dual", "feedback": True},
                     memory={"layers": [2], "size": 16, "neighbors": 4})


def main() -> None:
    import keras

    model = make_model(RECIPE, streams=("predict",))
    randomize_weights(model, seed=5)
    rng = np.random.default_rng(9)
    first = {"tokens": rng.integers(1, 50, size=(2, 8)).astype("int32"), "start_of_sequence": np.array([True, True])}
    model(first)
    model.save(HERE / "model_jax.keras")
    nxt = {"tokens": rng.integers(1, 50, size=(2, 8)).astype("int32"), "start_of_sequence": np.array([False, True])}
    np.savez_compressed(HERE / "model_jax_next.npz", tokens=nxt["tokens"], starts=nxt["start_of_sequence"],
                        logits=to_numpy(model(nxt)))
    print(f"wrote {HERE / 'model_jax.keras'} on {keras.backend.backend()}")


if __name__ == "__main__":
    main()
