"""The memorizing model's training step against memory size, for each memory store: tokens/s, peak
memory (process max RSS), and recall@k of each store against exact top-k.

    python benchmarks/memory.py --backend jax [--stores exact,bucketed,jax_approx,exact_host,hnsw]
        [--sizes 8192,32768,65536,262144,1048576] [--heads 1] [--steps 3]

The model is memorizing_tiny (L=2, E=128, D=32, T5 bias, memory in the top layer, k=32) with batch 1,
segments of 256 and `--heads` heads. Each (store, size) runs in its own process (peak memory is that
process's). The memory of every (row, head) is filled first to `size` entries of clustered unit keys
(device stores: written into the state variables; host stores: through their own `write`, i.e. the
index is built), then `--steps` training steps are timed after one warm-up step. recall@k: for 256
clustered queries against the same memory, the share of the store's k retrieved entries that are among
the exact top k. A (store, size) that would exceed `--max-seconds` of filling is skipped and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SEGMENT, NEIGHBORS, DIM = 256, 32, 32


def clustered(rng, shape, centers):
    import numpy as np

    x = centers[rng.integers(0, len(centers), shape[:-1])] + 0.35 * rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def one(store: str, size: int, heads: int, steps: int) -> dict:
    """Runs in a child process: builds, fills, times; returns one row."""
    import numpy as np
    import keras

    from meliad_core import assemble
    from meliad_core.model import build_model
    from meliad_core.recipes import load_recipe

    recipe = load_recipe("memorizing_tiny", [
        f"memory.store={store}", f"memory.size={size}", f"memory.neighbors={NEIGHBORS}", f"model.num_heads={heads}",
        f"model.head_dim={DIM}", "data.batch_size=1", f"data.segment_length={SEGMENT}", f"attention.window={SEGMENT}",
        "model.dropout=0.0", "model.attn_dropout=0.0"])
    model = build_model(recipe, vocab_size=256, streams=("train",))
    model.compile(optimizer="adam")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(64, DIM))
    start = time.perf_counter()
    layer = next(b.memory for b in model.stack.blocks if b.memory is not None)
    if layer.host:
        for _ in range(size // SEGMENT):
            keys = clustered(rng, (1, heads, SEGMENT, DIM), centers)
            layer.host_store().write("train", keys, keys)
    else:
        keys = clustered(rng, (1, heads, size, DIM), centers)
        variables = {k.split("/")[-1]: v for k, v in model.state_vars["train"].items() if "memory" in k}
        variables["memory_keys"].assign(keys)
        variables["memory_values"].assign(keys)
        variables["memory_index"].assign(np.full((1,), size, "int32"))
    fill = time.perf_counter() - start
    batch = {"tokens": rng.integers(1, 256, (1, SEGMENT)).astype("int32"), "start_of_sequence": np.zeros((1,), bool)}
    model.train_on_batch(batch)  # compile and warm up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        model.train_on_batch(batch)
        times.append(time.perf_counter() - t)
    step = sorted(times)[len(times) // 2]
    # recall@k against exact top-k over the same memory (the store as it now is)
    queries = clustered(rng, (1, heads, SEGMENT, DIM), centers)
    if layer.host:
        _, got = layer.host_store().retrieve("train", queries, NEIGHBORS)
        ring_keys = layer.host_store().state()["train/keys"][0]
        count = int(layer.host_store().state()["train/count"][0])
        live = ring_keys[:, [(c % ring_keys.shape[1]) for c in range(count - size, count)]]
    else:
        state = model.get_stream_state("train")
        key_db = [v for k, v in state.items() if k.endswith("memory_keys")][0]
        filled = np.ones((1, size), bool)
        _, got = assemble.memory_store(store).retrieve(key_db, key_db, filled, queries, NEIGHBORS, 0)
        got = keras.ops.convert_to_numpy(got)
        live = key_db[0]
    exact = np.argsort(-np.einsum("hnd,hmd->hnm", queries[0], live), axis=-1, kind="stable")[..., :NEIGHBORS]
    want = np.take_along_axis(live[:, None], exact[..., None], axis=2)  # (H, N, k, D)
    hits = [len({r.tobytes() for r in g} & {r.tobytes() for r in w}) / NEIGHBORS
            for g, w in zip(got[0].reshape(-1, NEIGHBORS, DIM), want.reshape(-1, NEIGHBORS, DIM))]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (Linux: KiB)
    return {"store": store, "size": size, "step_s": step, "tokens_per_s": SEGMENT / step, "peak_gib": peak,
            "recall": float(np.mean(hits)), "fill_s": fill}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"))
    parser.add_argument("--stores", help="default: exact,bucketed,exact_host,hnsw, and jax_approx on jax")
    parser.add_argument("--sizes", default="8192,32768,65536,262144,1048576")
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per (store, size) before it is skipped")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = args.backend
    if args.stores is None:
        args.stores = "exact,bucketed," + ("jax_approx," if args.backend == "jax" else "") + "exact_host,hnsw"
    if args.one:
        store, size = args.one.split(":")
        print(json.dumps(one(store, int(size), args.heads, args.steps)))
        return
    from _common import machine

    print(f"command: python benchmarks/memory.py --backend {args.backend} --stores {args.stores} --sizes {args.sizes} "
          f"--heads {args.heads} --steps {args.steps}")
    print(f"machine: {machine()}; load average: {open('/proc/loadavg').read().split()[:3]}")
    print(f"model: memorizing_tiny, batch 1, segment {SEGMENT}, heads {args.heads}, head_dim {DIM}, k={NEIGHBORS}")
    print(f"{'store':<11} {'entries':>9} {'step s':>8} {'tok/s':>8} {'peak GiB':>9} {'recall@k':>9} {'vs 8k':>6} "
          f"{'fill s':>7}")
    base = {}
    for store in args.stores.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            cmd = [sys.executable, __file__, "--backend", args.backend, "--heads", str(args.heads),
                   "--steps", str(args.steps), "--one", f"{store}:{size}"]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"{store:<11} {size:>9} skipped: over {args.timeout:.0f} s", flush=True)
                continue
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{store:<11} {size:>9} failed: {last}", flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            base.setdefault(store, row["step_s"])
            print(f"{store:<11} {size:>9} {row['step_s']:>8.3f} {row['tokens_per_s']:>8.0f} {row['peak_gib']:>9.2f} "
                  f"{row['recall']:>9.3f} {row['step_s'] / base[store]:>5.2f}x {row['fill_s']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
