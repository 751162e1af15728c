"""Can a memorizing model's kNN lookup find what a copy needs? For runs on `lines` ledgers
(`data.options.layout: lines`): for every word (token) of a read-back or far recall after its first,
the rank of the key a copy needs — at the next token of the fact's previous mention — among the keys the
query can use, by the memory layer's raw q·k, per head. Locally (read-backs) that is the ≤ 2W keys of
the window and the XL cache; for far recalls, the memory's keys (the `memory.size` tokens before the
segment). A lookup of k neighbours finds the key only when its rank is below k.

    python benchmarks/knn_probe.py runs/ledgers_memorizing --documents 2

Which key is "needed": the query at token t (word j−1 of the value) predicts word j; the earlier mention
holds word j at token s, whose key knows word j−1 only if the model built it so (a previous-token head
below, or `model.smear_keys`). docs/long_range.md, experiment 15, has the numbers of one run.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np

LINE = re.compile(r"^(\w+)(: | = )([a-z]+(?: [a-z]+)*)\.$", re.M)


def copy_pairs(text: str, far_starts: set[int], starts: np.ndarray, ends: np.ndarray
               ) -> list[tuple[str, int, int]]:
    """(kind, query token, needed key token) for every token of a read-back after the first: the query is
    the token before (it predicts this one) and the key this token's place in the fact's previous mention.
    kind is "far recall" for the tagged read-backs (their value starts in `far_starts`), else "read-back"."""
    def tokens(a: int, z: int) -> list[int]:
        return [i for i in range(len(starts)) if ends[i] > a and starts[i] < z]

    previous: dict[str, list[int]] = {}
    pairs = []
    for match in LINE.finditer(text):
        name, (a, z) = match.group(1), match.span(3)
        mention = tokens(a, z)
        if match.group(2) == " = " and name in previous and len(previous[name]) == len(mention):
            kind = "far recall" if a in far_starts else "read-back"
            pairs += [(kind, mention[j - 1], previous[name][j]) for j in range(1, len(mention))]
        previous[name] = mention
    return pairs


def key_ranks(queries: np.ndarray, keys: np.ndarray, pairs, segment_length: int, window: int,
              memory_size: int) -> dict[str, np.ndarray]:
    """kind -> (pairs, heads) rank of the needed key among the usable ones (0: the best score).

    queries, keys (T, H, D) of one document; a read-back's query sees the keys from one window before its
    own window's start up to itself; a far recall's the `memory_size` keys before its segment. Pairs whose
    needed key is outside that range are left out."""
    found: dict[str, list[np.ndarray]] = {}
    for kind, t, s in pairs:
        if kind == "far recall":
            hi = t // segment_length * segment_length
            lo = max(0, hi - memory_size)
        else:
            lo, hi = max(0, t // window * window - window), t + 1
        if not lo <= s < hi:
            continue
        scores = np.einsum("hd,jhd->hj", queries[t], keys[lo:hi])
        found.setdefault(kind, []).append((scores > scores[:, s - lo][:, None]).sum(axis=1))
    return {kind: np.array(ranks) for kind, ranks in found.items()}


def record_memory_layers(model) -> dict[str, list]:
    """Wraps each memory layer's `call` to keep its (queries, keys) per segment (batch row 0)."""
    from keras import ops

    recorded: dict[str, list] = {}
    for block in model.stack.blocks:
        memory = getattr(block, "memory", None)
        if memory is None:
            continue
        original = memory.call

        def call(q, k, *args, _original=original, _name=block.name, **kwargs):
            recorded.setdefault(_name, []).append((ops.convert_to_numpy(q)[0], ops.convert_to_numpy(k)[0]))
            return _original(q, k, *args, **kwargs)

        memory.call = call
    return recorded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="a memorizing run on `lines` ledgers (with a checkpoint)")
    parser.add_argument("--documents", type=int, default=2, help="eval documents to probe (default 2)")
    parser.add_argument("--top", type=int, default=32, help="report the share of ranks below this (default 32)")
    parser.add_argument("--backend", choices=("jax", "torch", "tensorflow"),
                        help="Keras backend (default: $KERAS_BACKEND, else jax)")
    args = parser.parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("KERAS_BACKEND", "jax")
    from meliad_core import checkpoint as ckpt
    from meliad_core.data import open_documents
    from meliad_core.model import build_model
    from meliad_core.vocab import load_vocabulary

    found = ckpt.latest_valid_checkpoint(Path(args.workdir), warn=lambda message: None)
    if found is None:
        print(f"{args.workdir}: no valid checkpoint (is it a finished run's workdir?)", file=sys.stderr)
        return 1
    path, manifest, arrays = found
    try:
        recipe = ckpt.stored_recipe(path, manifest)
    except ckpt.CheckpointError as exc:
        print(exc, file=sys.stderr)
        return 1
    options = recipe.data.options or {}
    if recipe.memory is None or recipe.data.source != "synthetic" or options.get("layout") != "lines":
        print(f"{args.workdir}: needs a memorizing run on the synthetic source with data.options.layout: lines",
              file=sys.stderr)
        return 1
    vocabulary = load_vocabulary(recipe.data)
    model = build_model(recipe, vocab_size=recipe.model.vocab_size or vocabulary.vocab_size, batch_size=1,
                        streams=("predict",))
    ckpt.restore(model, None, manifest, arrays, weights_only=True)
    recorded = record_memory_layers(model)
    documents = open_documents(recipe.data, "eval", 0)
    n = recipe.data.segment_length
    ranks: dict[tuple[str, str], list[np.ndarray]] = {}
    for index in range(min(args.documents, len(documents))):
        document = documents[index]
        ids, starts, ends = vocabulary.encode_with_offsets(document.text)
        length = len(ids) // n * n
        for layer in recorded.values():
            layer.clear()
        for s in range(0, length, n):
            model({"tokens": np.asarray(ids[None, s:s + n], "int32"), "start_of_sequence": np.array([s == 0])})
        pairs = [p for p in copy_pairs(document.text, {a for a, _ in document.long_range_spans}, starts, ends)
                 if p[1] < length]
        for name, segments in recorded.items():
            queries = np.concatenate([q for q, _ in segments])
            keys = np.concatenate([k for _, k in segments])
            for kind, r in key_ranks(queries, keys, pairs, n, recipe.attention.window, recipe.memory.size).items():
                ranks.setdefault((name, kind), []).append(r)
    if not ranks:
        print("no read-backs or far recalls found in the probed documents: try --documents 4", file=sys.stderr)
        return 1
    print(f"{args.workdir}: rank of the needed key by raw q·k, per head ({args.documents} eval documents)")
    print(f"| layer | mention | words | median rank per head | share in the top {args.top} |")
    print("|---|---|---|---|---|")
    for (name, kind), parts in sorted(ranks.items()):
        r = np.concatenate(parts)
        medians = ", ".join(f"{m:g}" for m in np.median(r, axis=0))
        shares = ", ".join(f"{x:.0%}" for x in (r < args.top).mean(axis=0))
        print(f"| {name} | {kind} | {len(r)} | {medians} | {shares} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
