"""Where a training step's time goes, per architecture and backend, by switching parts off.

    python benchmarks/profile_step.py [--backends jax torch tensorflow] [--archs xl memorizing recurrent]
                                 [--size tiny_test] [--batch-size B]

For each architecture, a fresh model is trained with train_on_batch (compiled as Keras compiles it on
that backend: jax.jit, tf.function, torch eager) once as it is ("step") and once with one part
replaced by a near-free stand-in of the same shapes that keeps the gradient flowing; the difference
is that part's share of a step (forward and backward):

    attention  every attention kernel call (local windows, recurrent self/cross attention) -> q + mean(v)
    retrieval  the memory store's kNN lookup -> zeros
    writes     the memory's FIFO write of the segment -> the memory unchanged
    loss       the per-token cross-entropy over the vocabulary (once per step, for the loss and the
               metrics) -> mean of the logits
    metrics    the bits/accuracy trackers' updates (argmax included) -> none
    optimizer  the optimizer's update -> variables unchanged (gradients still computed and consumed)

plus "forward" (predict_on_batch of the same model: the forward pass alone, with its host transfer)
and "Keras floor" (train_on_batch of a one-Dense-layer model with SGD: the per-step cost of Keras and
the framework's dispatch, the host round trip of the returned logs included). "rest" is step minus
the parts: embeddings, projections, FFNs, norms, gates, Keras/Python. The recurrent cell's cost is
the recurrent row's step minus the XL row's (same size, one recurrent layer). Parts are measured
one at a time, so they need not add up exactly; on a busy machine compare within one run only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

PARTS = ("attention", "retrieval", "writes", "loss", "metrics", "optimizer")
ARCH_PARTS = {"xl": ("attention", "loss", "metrics", "optimizer"), "memorizing": PARTS,
              "recurrent": ("attention", "loss", "metrics", "optimizer")}


class _FreeAttention:
    name = "free"

    def attend(self, q, k, v, *, bias=None, mask=None, scale=None, dropout_mask=None):
        from keras import ops

        return q + ops.mean(v, axis=2, keepdims=True)


class _FreeStore:
    def retrieve(self, key_db, value_db, filled, queries, num_neighbors, query_chunk=0):
        from keras import ops

        shape = tuple(queries.shape[:3]) + (num_neighbors, key_db.shape[-1])
        zeros = ops.zeros(shape, key_db.dtype) + 0 * ops.mean(queries)
        return zeros, zeros


def _switch_off(model, part: str, stack: contextlib.ExitStack) -> None:
    """Replaces `part` of `model` (before its step is first compiled)."""
    import keras
    from keras import ops

    from meliad_core.layers import knn_memory

    if part == "attention":
        for layer in model._flatten_layers(include_self=False):
            if hasattr(getattr(layer, "kernel", None), "attend"):
                object.__setattr__(layer, "kernel", _FreeAttention())
    elif part == "retrieval":
        for layer in model._flatten_layers(include_self=False):
            if isinstance(layer, knn_memory.KNNMemory):
                object.__setattr__(layer, "store", _FreeStore())
    elif part == "writes":
        original = knn_memory.write_segment
        knn_memory.write_segment = lambda key_db, value_db, index, keys, values: (key_db, value_db,
                                                                                  index + keys.shape[2])
        stack.callback(setattr, knn_memory, "write_segment", original)
    elif part == "loss":
        # the per-token cross-entropy (computed once per step, shared by the loss and the metrics)
        from meliad_core import model as model_module

        original_losses = model_module.token_losses

        def free_losses(tokens, logits, loss_mask_ids=()):
            nats = ops.mean(ops.cast(logits, "float32"), axis=-1)
            valid = ops.ones_like(nats)
            return nats, valid, ops.cast(tokens, "int32")

        model_module.token_losses = free_losses
        stack.callback(setattr, model_module, "token_losses", original_losses)
    elif part == "metrics":
        model._update_token_metrics = lambda logits, nats, valid, targets: None
    elif part == "optimizer":
        backend = keras.backend.backend()
        opt = model.optimizer
        if backend == "jax":
            # the gradients must still be consumed, or XLA would drop the whole backward pass
            def stateless_apply(optimizer_variables, grads, trainable_variables):
                return [v + 0.0 * ops.sum(g) for v, g in zip(trainable_variables, grads)], optimizer_variables

            opt.stateless_apply = stateless_apply
        elif backend == "tensorflow":
            def apply_gradients(pairs):
                for g, v in pairs:
                    v.assign_add(0.0 * ops.sum(g))

            opt.apply_gradients = apply_gradients
        else:
            opt.apply = lambda grads, variables=None: None


def _model(size: str, arch: str, batch_size: int | None, sets=()):
    from meliad_core.config import validate_recipe
    from meliad_core.model import build_model
    from meliad_core.optimizers import make_optimizer
    from meliad_core.recipes import apply_override, resolve_recipe_mapping
    from throughput import ARCH_OVERRIDES

    mapping = resolve_recipe_mapping(f"sizes/{size}")
    n = mapping["data"]["segment_length"]
    extra = [o.format(N=n, S=min(512, 2 * mapping["attention"]["window"])) for o in ARCH_OVERRIDES[arch]]
    for text in extra + ["model.dropout=0.0", "model.attn_dropout=0.0"] + (
            [f"data.batch_size={batch_size}"] if batch_size else []) + list(sets):
        mapping = apply_override(mapping, text)
    recipe = validate_recipe(mapping)
    model = build_model(recipe, vocab_size=259, streams=("train", "predict"))
    model.compile(optimizer=make_optimizer(recipe.train, 10_000))
    return model, recipe.data.batch_size, recipe.data.segment_length


def _time(fn, steps: int, intervals: int, warmup: int = 2) -> float:
    import statistics
    import time

    for i in range(warmup):
        fn(i)
    times = []
    for _ in range(intervals):
        start = time.perf_counter()
        for i in range(steps):
            out = fn(i)
        float(out)  # waits for the device
        times.append(time.perf_counter() - start)
    return statistics.median(times) / steps


def profile_one(size: str, arch: str, steps: int, intervals: int, batch_size: int | None, sets=(),
                parts=PARTS) -> dict:
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    batches = {}

    def batch(i, b, n):
        if (i, b, n) not in batches:
            batches[(i, b, n)] = {"tokens": rng.integers(1, 259, size=(b, n)).astype("int32"),
                                  "start_of_sequence": np.full((b,), i % 8 == 0)}
        return batches[(i, b, n)]

    result = {"backend": keras.backend.backend(), "size": size, "arch": arch}
    for part in ("step",) + tuple(p for p in ARCH_PARTS[arch] if p in parts):
        with contextlib.ExitStack() as stack:
            model, b, n = _model(size, arch, batch_size, sets)
            if part != "step":
                _switch_off(model, part, stack)

            def train(i, model=model, b=b, n=n):
                return model.train_on_batch(batch(i % 16, b, n), return_dict=True)["loss"]

            result[part] = _time(train, steps, intervals)
            if part == "step":
                def forward(i, model=model, b=b, n=n):
                    return np.asarray(model.predict_on_batch(batch(i % 16, b, n))).ravel()[0]

                result["forward"] = _time(forward, steps, intervals)
                result["tokens"] = b * n
    # the per-step floor of Keras itself
    tiny = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    tiny.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((2, 4), "float32"), np.ones((2, 1), "float32")
    result["keras_floor"] = _time(lambda i: tiny.train_on_batch(x, y), steps, intervals)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["jax", "torch", "tensorflow"])
    parser.add_argument("--archs", nargs="+", default=["xl", "memorizing", "recurrent"])
    parser.add_argument("--size", default="tiny_test")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--intervals", type=int, default=3)
    parser.add_argument("--threads", default=None, help="MELIAD_THREADS for the runs (default: the environment's)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for every run (repeatable)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        from meliad_core.threads import configure_threads

        configure_threads(args.threads)
        print(json.dumps(profile_one(args.size, args.one, args.steps, args.intervals, args.batch_size, args.sets,
                                     args.parts)))
        return
    from _common import machine, print_table

    print(f"command: python benchmarks/profile_step.py {' '.join(sys.argv[1:])}")
    with open("/proc/loadavg") as f:
        print(f"machine: {machine()}; load at start {' '.join(f.read().split()[:3])}")
    header = ["backend", "arch", "step ms", "tokens/s", "forward", "attention", "retrieval", "writes", "loss",
              "metrics", "optimizer", "Keras floor", "rest"]
    rows, steps = [], {}
    for backend in args.backends:
        python = os.environ.get(f"MELIAD_PYTHON_{backend.upper()}", sys.executable)
        for arch in args.archs:
            cmd = [python, __file__, "--one", arch, "--size", args.size, "--steps", str(args.steps), "--intervals",
                   str(args.intervals)] + (["--batch-size", str(args.batch_size)] if args.batch_size else []) + (
                      ["--threads", args.threads] if args.threads else []) + ["--parts", *args.parts] + [
                      x for text in args.sets for x in ("--set", text)]
            proc = subprocess.run(cmd, env={**os.environ, "KERAS_BACKEND": backend}, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                rows.append([backend, arch, f"failed: {tail[:80]}"] + [""] * (len(header) - 3))
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            step = r["step"]
            steps[(backend, arch)] = step
            saved = {p: step - r[p] for p in PARTS if p in r}

            def cell(seconds):
                return f"{seconds * 1000:.1f} ({seconds / step:.0%})"

            parts = [cell(saved[p]) if p in saved else "-" for p in PARTS]
            rest = step - sum(max(0.0, s) for s in saved.values())
            rows.append([backend, arch, f"{step * 1000:.1f}", f"{r['tokens'] / step:,.0f}", cell(r["forward"]),
                         *parts, cell(r["keras_floor"]), cell(rest)])
    print_table(header, rows)
    print("ms per step saved by switching each part off (share of the step); negative: within noise")
    for backend in args.backends:
        if (backend, "recurrent") in steps and (backend, "xl") in steps:
            cell_ms = (steps[(backend, "recurrent")] - steps[(backend, "xl")]) * 1000
            print(f"{backend}: recurrent cell ≈ recurrent step − XL step = {cell_ms:.1f} ms")


if __name__ == "__main__":
    main()
