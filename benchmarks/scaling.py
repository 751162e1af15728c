"""How the cost grows: time per token vs segment length at a fixed window (XL), and the memory layer's
cost vs memory size (Memorizing Transformer).

    python benchmarks/scaling.py --backend jax
    python benchmarks/scaling.py --backend torch --parts segment --segment-lengths 256 1024 4096 --window 256
    python benchmarks/scaling.py --parts memory --memory-sizes 1024 8192 65536 --neighbors 32

Part `segment`: the Transformer-XL model of --size with attention.window fixed at --window and
data.segment_length N growing. Attention is computed window by window (each query sees its own window
and the one before), so the work per token, and the time per token, should stay about flat as N grows;
a quadratic attention would double it with every doubling of N.

Part `memory`: the same model with one kNN memory layer (memory.layers=[-1], window = segment length
= --memory-segment-length, as meliad requires) and memory.size growing. It shows what the memory
costs per step, and the peak memory of the process; `state MiB` is the size of the train stream's
carried state (caches plus the keys and values of the memory).

Each configuration runs in its own process (so peak memory is its own). Random token batches are fed
with train_on_batch (the data pipeline is not timed), a document starts only on the first batch (the
memory fills up), and after warm-up steps the median of several timed intervals (each of at least
--steps steps and --min-tokens tokens) is reported. On a CPU "peak MiB" is the process's peak resident
set size (Python and the framework included); on a GPU it is the device's peak allocation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

PARTS = ("segment", "memory")
SIZES = ("tiny_test", "small_test")


def overrides_for(part: str, value: int, window: int, memory_segment_length: int, neighbors: int) -> list[str]:
    """Recipe overrides of one configuration: `value` is the segment length or the memory size."""
    if part == "segment":
        return [f"data.segment_length={value}", f"attention.window={window}"]
    return [f"data.segment_length={memory_segment_length}", f"attention.window={memory_segment_length}",
            "memory.layers=[-1]", f"memory.size={value}", f"memory.neighbors={neighbors}"]


def one(size: str, part: str, value: int, args: argparse.Namespace) -> dict:
    import keras
    import numpy as np

    from _common import accelerator_in_use, peak_memory_mib, time_training
    from meliad_core.config import validate_recipe
    from meliad_core.model import build_model
    from meliad_core.optimizers import make_optimizer
    from meliad_core.recipes import apply_override, resolve_recipe_mapping

    mapping = resolve_recipe_mapping(f"sizes/{size}")
    extra = overrides_for(part, value, args.window, args.memory_segment_length, args.neighbors)
    for text in extra + ["model.dropout=0.0", "model.attn_dropout=0.0", f"attention.kernel={args.kernel}"] + (
            [f"data.batch_size={args.batch_size}"] if args.batch_size else []) + args.sets:
        mapping = apply_override(mapping, text)
    recipe = validate_recipe(mapping)
    model = build_model(recipe, vocab_size=259, streams=("train",))
    model.compile(optimizer=make_optimizer(recipe.train, 10_000))
    b, n = recipe.data.batch_size, recipe.data.segment_length
    rng = np.random.default_rng(0)

    def batch(i):
        return {"tokens": rng.integers(1, 259, size=(b, n)).astype("int32"),
                "start_of_sequence": np.full((b,), i == 0)}

    steps = max(args.steps, -(-args.min_tokens // (b * n)))  # short segments: more steps per interval
    seconds = time_training(model, batch, steps, args.intervals, args.warmup)
    state_bytes = sum(int(np.prod(v.shape)) * np.dtype(str(v.dtype)).itemsize
                      for v in model.state_vars["train"].values())
    return {"part": part, "value": value, "backend": keras.backend.backend(), "device": accelerator_in_use(),
            "batch": b, "segment_length": n, "window": recipe.attention.window,
            "memory_size": recipe.memory.size if recipe.memory else None, "step_ms": seconds * 1000,
            "us_per_token": seconds / (b * n) * 1e6, "tokens_per_s": b * n / seconds,
            "peak_mib": peak_memory_mib(), "state_mib": state_bytes / 2**20}


def _label(value: int) -> str:
    return f"{value // 1024}k" if value >= 1024 and value % 1024 == 0 else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("jax", "torch", "tensorflow"),
                        default=os.environ.get("KERAS_BACKEND", "jax"))
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                        help="segment: time per token vs segment length; memory: cost vs memory size")
    parser.add_argument("--size", default="tiny_test", choices=SIZES, help="model size recipe (default tiny_test)")
    parser.add_argument("--segment-lengths", nargs="+", type=int, default=[128, 256, 512, 1024, 2048],
                        metavar="N", help="segment lengths of the segment part (multiples of --window)")
    parser.add_argument("--window", type=int, default=128, help="attention window of the segment part (default 128)")
    parser.add_argument("--memory-sizes", nargs="+", type=int, default=[1024, 4096, 16384, 32768], metavar="M",
                        help="memory sizes of the memory part (multiples of --memory-segment-length and --neighbors)")
    parser.add_argument("--memory-segment-length", type=int, default=256,
                        help="segment length = window of the memory part (default 256)")
    parser.add_argument("--neighbors", type=int, default=128, help="memory.neighbors of the memory part (default 128)")
    parser.add_argument("--kernel", default="auto", help="attention.kernel for every run (default auto)")
    parser.add_argument("--batch-size", type=int, default=None, help="override data.batch_size")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed interval (at least)")
    parser.add_argument("--min-tokens", type=int, default=8192,
                        help="tokens per timed interval (at least; more steps for short segments)")
    parser.add_argument("--intervals", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for every run (repeatable)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        size, part, value = args.one.split(":")
        print(json.dumps(one(size, part, int(value), args)))
        return
    from _common import machine, print_table

    print(f"command: python benchmarks/scaling.py {' '.join(sys.argv[1:])}")
    print(f"machine: {machine()}")
    env = {**os.environ, "KERAS_BACKEND": args.backend}
    shared = ["--size", args.size, "--window", str(args.window), "--memory-segment-length",
              str(args.memory_segment_length), "--neighbors", str(args.neighbors), "--kernel", args.kernel,
              "--steps", str(args.steps), "--min-tokens", str(args.min_tokens), "--intervals", str(args.intervals),
              "--warmup", str(args.warmup)]
    if args.batch_size:
        shared += ["--batch-size", str(args.batch_size)]
    for text in args.sets:
        shared += ["--set", text]
    rows = []
    for part in args.parts:
        values = args.segment_lengths if part == "segment" else args.memory_sizes
        first = None
        for value in values:
            what = f"N={value}, W={args.window}" if part == "segment" else (
                f"M={_label(value)}, N=W={args.memory_segment_length}, k={args.neighbors}")
            cmd = [sys.executable, __file__, "--one", f"{args.size}:{part}:{value}", *shared]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                rows.append([part, what, args.backend, "-", "-", "-", "-", "-", "-", "-", f"failed: {tail[:80]}"])
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            first = first or r
            base = r["us_per_token"] / first["us_per_token"] if part == "segment" else r["step_ms"] / first["step_ms"]
            rows.append([part, what, r["backend"], r["device"], f"{r['batch']}x{r['segment_length']}",
                         f"{r['step_ms']:.1f}", f"{r['us_per_token']:.2f}", f"{r['tokens_per_s']:,.0f}",
                         f"{base:.2f}x", f"{r['peak_mib']:,.0f}", f"{r['state_mib']:,.1f}"])
    print_table(["part", "configuration", "backend", "device", "batch", "ms/step", "us/token", "tokens/s",
                 "vs first", "peak MiB", "state MiB"], rows)
    print("vs first: time per token (segment part) or per step (memory part) relative to the part's first row")


if __name__ == "__main__":
    main()
