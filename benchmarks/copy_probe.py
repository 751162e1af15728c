"""Has a model trained on the synthetic ledgers learned to copy a fact's value? Bits/token on every
mention of a value, by kind of mention: where it is stated (nothing to copy yet), each near read-back
(`data.options.near_recalls`: a few sentences after the statement, within a local window's reach) and the far recalls
(the long-range tokens: beyond the window). The first character of a value is reported apart from the
rest, because only the first one needs the name to be matched; the rest can follow the first.

    python benchmarks/copy_probe.py runs/ledgers_xl                 # evaluates 24 eval batches first
    python benchmarks/copy_probe.py runs/ledgers_xl --batches 48
    python benchmarks/copy_probe.py --losses losses.npz             # from `meliad eval --token-losses`

A model that copies scores far below the statement's bits on the read-backs; one that only knows the
values' alphabet scores the same on all three kinds (docs/long_range.md, experiment 6). Ledgers of the
`lines` layout (`data.options.layout: lines`) give the same three kinds: a statement line ("Tarin: ..."),
a read-back line ("Tarin = ...") within `NEAR` characters of the fact's last mention, and the far recalls
(read-back lines further away: the long-range tokens). Needs the
`bytes` vocabulary (the ledgers demos use it): token i is UTF-8 byte i - 3.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

BYTE_OFFSET = 3  # the bytes vocabulary: ids 0..2 are padding/specials, id b + 3 is byte b
VALUE = re.compile(r"(?:code of \w+ is |lives in )([A-Z]{2}-\d{4}|\w+)\.")
LINE = re.compile(r"^(\w+)(: | = )([a-z]+(?: [a-z]+)*)\.$", re.M)  # the lines layout
NEAR = 400  # characters: a lines-layout read-back this close to the fact's last mention is local


def documents(losses: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(text, bits, scored) per document, in stream order: bits[t] is the loss of *predicting* token t."""
    tokens, bits, scored, starts = (losses[k] for k in ("tokens", "bits", "scored", "start_of_sequence"))
    batches, rows, n = tokens.shape
    found = []
    for row in range(rows):
        ids, row_bits, row_scored = tokens[:, row].reshape(-1), bits[:, row].reshape(-1), scored[:, row].reshape(-1)
        bounds = [k * n for k in range(batches) if starts[k, row]] + [batches * n]
        for a, z in zip(bounds[:-1], bounds[1:]):
            text = bytes(int(i) - BYTE_OFFSET if BYTE_OFFSET <= i < 256 + BYTE_OFFSET else 32
                         for i in ids[a:z]).decode("latin-1")
            # the loss of token t is computed at position t - 1
            target_bits = np.concatenate([[0.0], row_bits[a:z - 1]])
            target_scored = np.concatenate([[False], row_scored[a:z - 1].astype(bool)])
            found.append((text, target_bits, target_scored))
    return found


def mention_kind(text: str, at: int) -> str:
    sentence_start = max(text.rfind(". ", 0, at) + 2, text.rfind("\n", 0, at) + 1)
    if text.startswith("Read back", sentence_start):
        return "read-back"
    if text.startswith("These facts", text.rfind("\n", 0, at) + 1):
        return "stated"
    return "far recall"


def copy_table(losses: dict) -> dict[str, dict[str, tuple[float, int]]]:
    """kind -> {"first": (mean bits, tokens), "rest": (...)} over every value mention."""
    sums: dict[str, dict[str, list[float]]] = {}

    def add(kind: str, start: int, end: int, bits, scored) -> None:
        parts = sums.setdefault(kind, {"first": [], "rest": []})
        for part, (a, z) in (("first", (start, start + 1)), ("rest", (start + 1, end))):
            parts[part].extend(bits[t] for t in range(a, z) if scored[t])

    for text, bits, scored in documents(losses):
        for match in VALUE.finditer(text):
            add(mention_kind(text, match.start()), *match.span(1), bits, scored)
        last: dict[str, int] = {}
        for match in LINE.finditer(text):
            name, start = match.group(1), match.start(3)
            if match.group(2) == ": ":
                kind = "stated"
            else:
                kind = "read-back" if start - last.get(name, start - NEAR) < NEAR else "far recall"
            add(kind, *match.span(3), bits, scored)
            last[name] = start
    return {kind: {part: (float(np.mean(v)) if v else float("nan"), len(v)) for part, v in parts.items()}
            for kind, parts in sums.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", help="a finished ledgers run (evaluated with `meliad eval`)")
    parser.add_argument("--losses", help="an .npz written by `meliad eval --token-losses` instead")
    parser.add_argument("--batches", type=int, default=24, help="eval batches to score (default 24)")
    args = parser.parse_args(argv)
    if (args.workdir is None) == (args.losses is None):
        parser.error("give a WORKDIR or --losses FILE.npz (one of them)")
    path = args.losses
    if path is None:
        path = os.path.join(tempfile.mkdtemp(prefix="copy_probe-"), "losses.npz")
        command = [sys.executable, "-m", "meliad_core.cli", "eval", args.workdir, "--batches", str(args.batches),
                   "--token-losses", path]
        if subprocess.run(command).returncode != 0:
            return 1
    if not os.path.isfile(path):
        parser.error(f"--losses: {path} does not exist")
    table = copy_table(dict(np.load(path)))
    if not table:
        print("no fact values found: is this a synthetic-ledgers run with the bytes vocabulary?", file=sys.stderr)
        return 1
    print("| mention | first character, bits | tokens | rest of the value, bits | tokens |")
    print("|---|---|---|---|---|")
    order = [kind for kind in ("stated", "read-back", "far recall") if kind in table]
    for kind in order:
        (first, n_first), (rest, n_rest) = table[kind]["first"], table[kind]["rest"]
        print(f"| {kind} | {first:.3f} | {n_first} | {rest:.3f} | {n_rest} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
