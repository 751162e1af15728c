"""Writes tests/golden/checkpoint_jax/: a checkpoint of a tiny run trained 2 steps on JAX, plus the
logits its weights give on a fixed input, so every backend can prove it loads a JAX checkpoint.

    KERAS_BACKEND=jax python tests/golden/make_checkpoint_fixture.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from test_training import run_recipe  # noqa: E402

FIXTURE = HERE / "checkpoint_jax"
INPUT_SEED = 7


def fixed_input(batch_size: int, segment_length: int) -> dict:
    rng = np.random.default_rng(INPUT_SEED)
    return {"tokens": rng.integers(1, 259, size=(batch_size, segment_length)).astype("int32"),
            "start_of_sequence": np.array([True] * batch_size)}


def main() -> None:
    import keras

    from meliad_core import checkpoint as ckpt
    from meliad_core.config import validate_recipe
    from meliad_core.model import build_model
    from meliad_core.runner import run_training

    assert keras.backend.backend() == "jax", "the fixture is written on JAX"
    recipe = validate_recipe(run_recipe(steps=2, checkpoint_every=2))
    with tempfile.TemporaryDirectory() as tmp:
        run_training(recipe, Path(tmp))
        if FIXTURE.exists():
            shutil.rmtree(FIXTURE)
        shutil.copytree(Path(tmp) / "checkpoints" / "step_2", FIXTURE)
    manifest, arrays = ckpt.read_checkpoint(FIXTURE)
    model = build_model(recipe, vocab_size=259, streams=("predict",))
    ckpt.restore(model, None, manifest, arrays, weights_only=True)
    x = fixed_input(recipe.data.batch_size, recipe.data.segment_length)
    np.save(FIXTURE.parent / "checkpoint_jax_logits.npy", keras.ops.convert_to_numpy(model(x)))
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main()
