"""Run by tests/test_distribution.py in a fresh process (XLA_FLAGS must be set before JAX starts):
trains a tiny model of one architecture for a few steps on 1 device and on N simulated CPU devices
(data parallel, or model parallel with a 'model' axis of M devices), and prints one JSON line with
both runs' metrics and the per-device shard shapes.

    python tests/distributed_run.py ARCH N STEPS [M]
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(sys.argv[2])}"
os.environ["KERAS_BACKEND"] = "jax"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from meliad_core.config import validate_recipe  # noqa: E402
from meliad_core.data import keras_batches, stream  # noqa: E402
from meliad_core.distribution import make_distribution  # noqa: E402
from meliad_core.model import build_model  # noqa: E402
from meliad_core.optimizers import make_optimizer  # noqa: E402
from model_helpers import tiny_recipe  # noqa: E402


def run(arch: str, devices: int, steps: int, model_axis: int = 1) -> dict:
    distribution = {"devices": devices}
    if model_axis > 1:
        distribution.update(kind="model_parallel", model_axis=model_axis)
    mapping = tiny_recipe(arch, batch_size=8, model={"vocab_size": 259}, distribution=distribution,
                          train={"warmup": 2, "steps": steps})
    recipe = validate_recipe(mapping)
    with make_distribution(recipe.distribution, recipe.data.batch_size).scope():
        keras.utils.set_random_seed(0)
        model = build_model(recipe)
        initial = [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.trainable_weights]
        model.compile(optimizer=make_optimizer(recipe.train))
        history = model.fit(keras_batches(stream(recipe, split="train")), steps_per_epoch=steps, epochs=1,
                            verbose=0)
    state = {f"{stream_name}/{key}": [list(s.data.shape) for s in var.value.addressable_shards]
             for stream_name, variables in model.state_vars.items() for key, var in variables.items()}
    weights = {var.path: [list(s.data.shape) for s in var.value.addressable_shards]
               for var in model.trainable_weights}
    slots = {var.path: [list(s.data.shape) for s in var.value.addressable_shards]  # the optimizer's moments
             for var in model.optimizer.variables if len(var.shape) == 2}
    moved = max(float(np.abs(keras.ops.convert_to_numpy(v.value) - w).max())
                for v, w in zip(model.trainable_weights, initial))
    return {"metrics": {k: float(v[-1]) for k, v in history.history.items()}, "state": state, "weights": weights,
            "slots": slots, "moved": moved}


if __name__ == "__main__":
    arch, devices, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model_axis = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    print(json.dumps({"one": run(arch, 1, steps), "many": run(arch, devices, steps, model_axis)}))
