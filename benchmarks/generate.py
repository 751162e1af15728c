"""Decoding speed: tokens/s and time per token at positions 100, 1,000 and 10,000 of generated text.

    KERAS_BACKEND=jax python benchmarks/generate.py                      # the three architectures
    KERAS_BACKEND=torch python benchmarks/generate.py --arch memorizing --positions 100 1000

For each architecture (a small model: 4 layers, E=256, 8 heads of 32, MLP 1024, N=512; Transformer-XL with
W=128; Memorizing Transformer with an 8,192-entry memory, 32 neighbours, W=N=512; Block-Recurrent
Transformer with 512 recurrent states, W=128), batch 1, it decodes greedily token by token through the
compiled step (`MeliadLM.decoder()`) and reports the mean time per token over the N tokens starting at
each position (a whole segment: every window update and memory write is counted), and, for comparison,
the time of one segment-path forward over N tokens, which is what re-running the segment per token
costs. Flat means max/min of the per-position times within 1.15. Numbers vary with the machine's load
(printed); on a shared machine the CPU time of the process per token (`cpu`) is steadier than the wall
clock, so both are printed.

    KERAS_BACKEND=torch python benchmarks/generate.py --arch transformer_xl --before-after 256

`--before-after K` also times K tokens of the plain Keras step (`DecodingModel.lean = False`: the
layer's `__call__` around the step and every state variable assigned each token) against the lean one,
interleaved in blocks of 32 tokens in the same process, in CPU ms per token.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine  # noqa: E402

MODEL = {"num_layers": 4, "embed_dim": 256, "num_heads": 8, "head_dim": 32, "mlp_dim": 1024, "vocab_size": 256,
         "dropout": 0.0, "attn_dropout": 0.0}
ARCHS = {
    "transformer_xl": {"attention": {"window": 128}},
    "memorizing": {"attention": {"window": 512},
                   "memory": {"layers": [-1], "size": 8192, "neighbors": 32, "store": "bucketed"}},
    "block_recurrent": {"attention": {"window": 128},
                        "recurrence": {"layers": [-1], "num_states": 512, "gate": "fixed", "variant": "skip"}},
}


def build(arch: str, segment_length: int):
    from meliad_core.config import validate_recipe
    from meliad_core.model import build_model

    recipe = {"model": dict(MODEL), "data": {"segment_length": segment_length, "batch_size": 1}, **ARCHS[arch]}
    return build_model(validate_recipe(recipe), streams=("predict",))


def bench(arch: str, positions: list[int], segment_length: int, out, before_after: int = 0) -> dict:
    import numpy as np

    model = build(arch, segment_length)
    n = segment_length
    tokens = np.random.default_rng(0).integers(1, 256, size=(1, n)).astype("int32")
    batch = {"tokens": tokens, "start_of_sequence": np.ones((1,), bool)}
    model.predict_on_batch(batch)  # compile
    reps, t0, c0 = 3, time.perf_counter(), time.process_time()
    for _ in range(reps):
        model.predict_on_batch(batch)
    segment, segment_cpu = (time.perf_counter() - t0) / reps, (time.process_time() - c0) / reps

    decoder = model.decoder()
    decoder.reset()
    t0 = time.perf_counter()
    logits = decoder.step([1])  # compiles
    compile_s = time.perf_counter() - t0
    times = np.zeros(max(positions) + n)
    cpu = np.zeros_like(times)
    token = 1
    for i in range(1, len(times)):
        token = int(np.argmax(logits[0, 1:])) + 1
        t, c = time.perf_counter(), time.process_time()
        logits = decoder.step([token])
        times[i], cpu[i] = time.perf_counter() - t, time.process_time() - c
    per_position = {p: float(times[max(p, 1):p + n].mean()) for p in positions}
    cpu_position = {p: float(cpu[max(p, 1):p + n].mean()) for p in positions}
    values = list(per_position.values())
    result = {"arch": arch, "segment_s": segment, "segment_cpu_s": segment_cpu, "compile_s": compile_s,
              "per_position": per_position, "cpu_per_position": cpu_position,
              "flat": max(values) / min(values), "speedup": segment / max(values),
              "cpu_flat": max(cpu_position.values()) / min(cpu_position.values()),
              "cpu_speedup": segment_cpu / max(cpu_position.values()),
              "tokens_per_s": 1.0 / float(times[1:].mean())}
    cells = "  ".join(f"@{p:,}: {t * 1e3:6.2f} ms" for p, t in per_position.items())
    cpu_cells = "  ".join(f"@{p:,}: {t * 1e3:6.2f} ms" for p, t in cpu_position.items())
    print(f"{arch:16s} {result['tokens_per_s']:7.1f} tok/s  {cells}  max/min {result['flat']:.2f}  "
          f"segment path {segment * 1e3:7.1f} ms per token -> {result['speedup']:.1f}x faster  "
          f"(step compiled in {compile_s:.1f} s)\n{'':16s} cpu per token {cpu_cells}  max/min "
          f"{result['cpu_flat']:.2f}  segment path {segment_cpu * 1e3:7.1f} ms cpu -> "
          f"{result['cpu_speedup']:.1f}x", file=out, flush=True)
    if before_after:
        result["before_after"] = compare_lean(decoder, before_after, arch, out)
    return result


def compare_lean(decoder, count: int, arch: str, out, block: int = 32) -> dict:
    """CPU ms per token of the plain Keras step (lean off) and the lean one, interleaved in blocks."""
    import numpy as np

    spent = {False: [], True: []}
    for i in range(max(1, count // block)):
        for lean in (False, True):
            decoder.net.lean = lean
            c = time.process_time()
            for j in range(block):
                decoder.step([(i * block + j) % 200 + 1])
            spent[lean].append((time.process_time() - c) / block)
    decoder.net.lean = True
    before, after = float(np.median(spent[False])), float(np.median(spent[True]))
    print(f"{arch:16s} before/after (cpu ms per token, median of {len(spent[True])} blocks of {block}): "
          f"plain Keras step {before * 1e3:.2f}, lean step {after * 1e3:.2f} ({(1 - after / before) * 100:+.0f}% "
          f"time saved)", file=out, flush=True)
    return {"before_cpu_s": before, "after_cpu_s": after}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), nargs="*", default=list(ARCHS))
    parser.add_argument("--positions", type=int, nargs="*", default=[100, 1000, 10000])
    parser.add_argument("--segment-length", type=int, default=512)
    parser.add_argument("--before-after", type=int, default=0, metavar="K",
                        help="also compare K tokens of the plain Keras step with the lean one (CPU time)")
    args = parser.parse_args(argv)
    try:  # torch's OpenMP threads spin for milliseconds per op on a busy 2-core machine
        from meliad_core.threads import configure_threads

        configure_threads()
    except ImportError:
        pass
    import keras

    load = os.getloadavg()
    print(f"meliad decoding benchmark: backend {keras.backend.backend()}, {machine()}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    results = [bench(arch, sorted(args.positions), args.segment_length, sys.stdout, args.before_after)
               for arch in args.arch]
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    ok = all(r["flat"] <= 1.15 and r["speedup"] >= 5 for r in results)
    print("flat within 15% and >= 5x faster than re-running the segment: " + ("yes" if ok else "NO"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
