"""Training throughput (tokens/s) and peak memory for each architecture and size on one backend.

    python benchmarks/throughput.py --backend jax
    python benchmarks/throughput.py --backend torch --sizes small_test --archs recurrent --kernel reference

Each configuration runs in its own process (so peak memory is its own). Random token batches are fed
with train_on_batch (the data pipeline is not timed); after warm-up steps, the median of several
timed intervals is reported, and the time of the first step (where the backend compiles the step:
always on JAX, with train.compile on torch and TensorFlow, e.g. --set train.compile=true).

--flops also times a float32 matmul (n x n by n x n, compiled as the backend compiles a step) in the
same process, right after the model, and prints the model's FLOP rate beside it: model FLOPs per step
= 6 x parameters x tokens (forward and backward of every weight matmul, the logits included) + 12 x
layers x tokens x keys x heads x head_dim (the two attention products over the 2W keys of each
window, forward and backward). Memory retrieval and the recurrent cell's own attention are not
counted, so those architectures' rates are underestimates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

ARCHS = ("xl", "memorizing", "recurrent")
# size -> recipe keys; the sizes follow meliad's old tiny_test and small_test (spec §5.7)
SIZES = ("tiny_test", "small_test")
ARCH_OVERRIDES = {
    "xl": [],
    # the memory layer needs window == segment_length (spec §7.1)
    "memorizing": ["memory.layers=[-1]", "memory.size=8192", "memory.neighbors=128", "attention.window={N}"],
    "recurrent": ["recurrence.layers=[-1]", "recurrence.num_states={S}", "recurrence.gate=fixed",
                  "recurrence.variant=skip"],
}


def matmul_flops_per_s(n: int = 1024, repeats: int = 10) -> float:
    """float32 FLOP/s of an n x n by n x n matmul on this backend (jitted on JAX, tf.function on TF)."""
    import statistics
    import time

    import keras
    import numpy as np
    from keras import ops

    rng = np.random.default_rng(0)
    a = ops.convert_to_tensor(rng.normal(size=(n, n)).astype("float32"))
    b = ops.convert_to_tensor(rng.normal(size=(n, n)).astype("float32"))
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        fn = jax.jit(lambda a, b: a @ b)
    elif backend == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda a, b: tf.matmul(a, b))
    else:
        fn = ops.matmul
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        float(ops.convert_to_numpy(fn(a, b))[0, 0])  # waits for the device
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def model_flops_per_step(recipe, params: int) -> float:
    """6·P·T + 12·L·T·(2W)·H·D (see the module docstring)."""
    m, tokens = recipe.model, recipe.data.batch_size * recipe.data.segment_length
    keys = 2 * recipe.attention.window
    return 6 * params * tokens + 12 * m.num_layers * tokens * keys * m.num_heads * m.head_dim


def one(size: str, arch: str, steps: int, intervals: int, warmup: int, kernel: str, batch_size: int | None,
        sets: list[str], flops: bool = False) -> dict:
    import time

    import keras
    import numpy as np

    from _common import accelerator_in_use, peak_memory_mib, time_training
    from meliad_core.config import validate_recipe
    from meliad_core.model import build_model
    from meliad_core.optimizers import make_optimizer
    from meliad_core.recipes import apply_override, resolve_recipe_mapping

    mapping = resolve_recipe_mapping(f"sizes/{size}")
    n = mapping["data"]["segment_length"]
    extra = [o.format(N=n, S=min(512, 2 * mapping["attention"]["window"])) for o in ARCH_OVERRIDES[arch]]
    for text in extra + ["model.dropout=0.0", "model.attn_dropout=0.0", f"attention.kernel={kernel}"] + (
            [f"data.batch_size={batch_size}"] if batch_size else []) + sets:
        mapping = apply_override(mapping, text)
    recipe = validate_recipe(mapping)
    model = build_model(recipe, vocab_size=259, streams=("train",))
    model.compile(optimizer=make_optimizer(recipe.train, 10_000))
    b = recipe.data.batch_size
    rng = np.random.default_rng(0)

    def batch(i):
        return {"tokens": rng.integers(1, 259, size=(b, n)).astype("int32"),
                "start_of_sequence": np.full((b,), i % 8 == 0)}

    start = time.perf_counter()
    float(model.train_on_batch(batch(0), return_dict=True)["loss"])  # the first step compiles (where the backend does)
    first_step = time.perf_counter() - start
    seconds = time_training(model, batch, steps, intervals, warmup)
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    result = {"size": size, "arch": arch, "backend": keras.backend.backend(), "device": accelerator_in_use(),
              "batch": f"{b}x{n}", "params": params, "step_ms": seconds * 1000, "tokens_per_s": b * n / seconds,
              "peak_mib": peak_memory_mib(), "kernel": kernel, "jit_compile": str(model.jit_compile),
              "first_step_s": first_step}
    if flops:
        result["model_gflops"] = model_flops_per_step(recipe, params) / seconds / 1e9
        result["matmul_gflops"] = matmul_flops_per_s() / 1e9
    with open("/proc/loadavg") as f:
        result["load"] = f.read().split()[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("jax", "torch", "tensorflow"), default=os.environ.get("KERAS_BACKEND",
                                                                                                   "jax"))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--kernel", default="auto", help="attention.kernel for every run (default auto)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed interval")
    parser.add_argument("--intervals", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="override data.batch_size")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for every run (repeatable)")
    parser.add_argument("--flops", action="store_true",
                        help="also the model's FLOP rate and a float32 matmul's, measured in the same process")
    parser.add_argument("--threads", default=None, help="MELIAD_THREADS for the runs (default: the environment's)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        from meliad_core.threads import configure_threads

        configure_threads(args.threads)  # before Keras: meliad's thread defaults, as `meliad run` has them
        size, arch = args.one.split(":")
        print(json.dumps(one(size, arch, args.steps, args.intervals, args.warmup, args.kernel, args.batch_size,
                             args.sets, args.flops)))
        return
    from _common import machine, print_table

    print(f"command: python benchmarks/throughput.py {' '.join(sys.argv[1:])}")
    with open("/proc/loadavg") as f:
        print(f"machine: {machine()}; load at start {' '.join(f.read().split()[:3])}")
    rows = []
    env = {**os.environ, "KERAS_BACKEND": args.backend}
    for size in args.sizes:
        for arch in args.archs:
            cmd = [sys.executable, __file__, "--one", f"{size}:{arch}", "--steps", str(args.steps), "--intervals",
                   str(args.intervals), "--warmup", str(args.warmup), "--kernel", args.kernel]
            if args.batch_size:
                cmd += ["--batch-size", str(args.batch_size)]
            if args.flops:
                cmd += ["--flops"]
            if args.threads:
                cmd += ["--threads", args.threads]
            for text in args.sets:
                cmd += ["--set", text]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                rows.append([size, arch, args.backend, "-", "-", "-", "-", "-", "-", f"failed: {tail[:80]}"]
                            + ["-"] * (3 if args.flops else 0))
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append([size, arch, r["backend"], r["device"], r["batch"], f"{r['params'] / 1e6:.2f}M",
                         f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['peak_mib']:,.0f}",
                         f"{r['first_step_s']:.1f}"])
            if args.flops:
                rows[-1] += [f"{r['model_gflops']:.1f}", f"{r['matmul_gflops']:.1f}",
                             f"{r['model_gflops'] / r['matmul_gflops']:.0%}"]
    header = ["size", "arch", "backend", "device", "batch", "params", "ms/step", "tokens/s", "peak MiB",
              "first step s"]
    print_table(header + (["model GFLOP/s", "matmul GFLOP/s", "ratio"] if args.flops else []), rows)


if __name__ == "__main__":
    main()
