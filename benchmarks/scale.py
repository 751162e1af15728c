"""Data-parallel scaling: training tokens/s and the carried state per device for 1, 2, 4 and 8 devices.

On the CPU the devices are simulated (XLA_FLAGS=--xla_force_host_platform_device_count=8, set here
before JAX starts), so tokens/s shows the overhead of splitting, not a speed-up: the point is that
every device holds only its rows of the state (it shrinks as 1/devices) while the numbers stay those
of one device. On a GPU or TPU host the real devices are used.

    python benchmarks/scale.py [--arch memorizing] [--memory 8192] [--batch-size 8] [--steps 10]
                               [--model-axis 2]   # model parallel: weights split over 2 devices

With --model-axis M the weights (embedding, projections, FFN) are split over M devices as well, and the
last column shows them shrinking as 1/M.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--real-devices" not in sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["KERAS_BACKEND"] = "jax"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine  # noqa: E402


def recipe_for(arch: str, batch: int, memory: int, devices: int, model_axis: int = 1):
    from meliad_core.recipes import load_recipe

    base = {"xl": "transformer_xl_tiny", "memorizing": "memorizing_tiny", "recurrent": "block_recurrent_tiny"}[arch]
    split = "" if model_axis == 1 else f", kind: model_parallel, model_axis: {model_axis}"
    overrides = [f"data.batch_size={batch}", f"distribution={{devices: {devices}{split}}}", "train.warmup=2"]
    if arch == "memorizing":
        overrides.append(f"memory.size={memory}")
    return load_recipe(base, overrides=overrides)


def measure(arch: str, batch: int, memory: int, devices: int, steps: int, model_axis: int = 1) -> dict:
    from meliad_core.data import keras_batches, stream
    from meliad_core.distribution import make_distribution
    from meliad_core.model import build_model
    from meliad_core.optimizers import make_optimizer

    recipe = recipe_for(arch, batch, memory, devices, model_axis)
    with make_distribution(recipe.distribution, batch).scope():
        model = build_model(recipe, streams=("train",))
        model.compile(optimizer=make_optimizer(recipe.train))
        batches = keras_batches(stream(recipe, split="train"))
        model.fit(batches, steps_per_epoch=2, epochs=1, verbose=0)  # compile
        start = time.perf_counter()
        model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
        seconds = time.perf_counter() - start
    per_device = total = 0
    for var in model.state_vars["train"].values():
        shards = var.value.addressable_shards
        per_device += shards[0].data.nbytes
        total += sum(s.data.nbytes for s in shards)
    weights = sum(var.value.addressable_shards[0].data.nbytes for var in model.trainable_weights)
    tokens = steps * batch * recipe.data.segment_length
    return {"devices": devices, "tokens_per_second": tokens / seconds, "state_mib_per_device": per_device / 2**20,
            "state_mib_total": total / 2**20, "weights_mib_per_device": weights / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("xl", "memorizing", "recurrent"), default="memorizing")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--memory", type=int, default=8192, help="memory entries per (row, head)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--model-axis", type=int, default=1,
                        help="model parallel: split the weights over this many devices (each count of --devices "
                             "at least this)")
    parser.add_argument("--real-devices", action="store_true", help="use the host's devices, not 8 simulated CPUs")
    args = parser.parse_args()
    print(f"# python benchmarks/scale.py {' '.join(sys.argv[1:])}")
    print(f"# {machine()}; load {open('/proc/loadavg').read().split()[0]}")
    print("| devices | tokens/s | state MiB per device | state MiB in all | weights MiB per device |")
    print("|---|---|---|---|---|")
    for devices in args.devices:
        row = measure(args.arch, args.batch_size, args.memory, devices, args.steps,
                      args.model_axis if devices >= args.model_axis else 1)
        print(f"| {row['devices']} | {row['tokens_per_second']:,.0f} | {row['state_mib_per_device']:.3f} | "
              f"{row['state_mib_total']:.3f} | {row['weights_mib_per_device']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
