"""Has a model trained on the synthetic ledgers learned to copy a fact's value? Bits/token on every
mention of a value, by kind of mention: where it is stated (nothing to copy yet), each near read-back
(`data.options.near_recalls`: a few sentences after the statement, within a local window's reach) and the far recalls
(the long-range tokens: beyond the window). The first character (token) of a value is reported apart from
the rest, because only the first one needs the name to be matched; the rest can follow the first.

    python benchmarks/copy_probe.py runs/ledgers_xl                 # evaluates 24 eval batches first
    python benchmarks/copy_probe.py runs/ledgers_xl --batches 48
    python benchmarks/copy_probe.py --losses losses.npz             # from `meliad eval --token-losses`
    python benchmarks/copy_probe.py runs/recall_xl --batches 8      # a sentencepiece run: its own vocabulary
    python benchmarks/copy_probe.py --losses losses.npz --recipe runs/recall_xl       # names the vocabulary
    python benchmarks/copy_probe.py --losses losses.npz --recipe recipes/demos/recall_xl.yaml

A model that copies scores far below the statement's bits on the read-backs; one that only knows the
values' alphabet scores the same on all three kinds (docs/long_range.md, experiment 6). Ledgers of the
`lines` layout (`data.options.layout: lines`) give the same three kinds: a statement line ("Tarin: ..."),
a read-back line ("Tarin = ...") within `NEAR` characters of the fact's last mention, and the far recalls
(read-back lines further away: the long-range tokens).

Vocabularies: with the `bytes` one (the ledgers demos; `--losses` alone assumes it) token i is UTF-8 byte
i - 3 and each character is a token. Any other (`data.vocabulary: sentencepiece` with
`data.options.vocabulary_path`, as recall_xl) is read from the run's recipe: the newest checkpoint's for a
WORKDIR, `--recipe` with `--losses`. Each document's text is then rebuilt piece by piece, each token's
text starting at a known character, so a value maps to the tokens covering it and the table reports the
value's *first token* apart from the rest. SentencePiece turns newlines into spaces, so lines are found
as sentences. A relative `vocabulary_path` is read from the working directory (run from the repository
root, as `meliad run` did). Read-backs of a recipe with `data.options.read_back_distance` may lie further
back than `NEAR`, so such a run's boundary is its `min_recall_distance` (every far recall lies at least
that far from the fact's last mention); `--near` sets it by hand.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    from meliad_core.config import DataConfig, Recipe
    from meliad_core.vocab import Vocabulary

BYTE_OFFSET = 3  # the bytes vocabulary: ids 0..2 are padding/specials, id b + 3 is byte b
VALUE = re.compile(r"(?:code of \w+ is |lives in )([A-Z]{2}-\d{4}|\w+)\.")
LINE = re.compile(r"^(\w+)(: | = )([a-z]+(?: [a-z]+)*)\.$", re.M)  # the lines layout
# the lines layout once a vocabulary has turned each newline into a space: a line is a sentence
SENTENCE_LINE = re.compile(r"(?<!\S)(\w+)(: | = )([a-z]+(?: [a-z]+)*)\.(?!\S)")
STATED = re.compile(r"The code of \w+ is |\w+ lives in ")  # a prose statement: its sentence up to the value
NEAR = 400  # characters: a lines-layout read-back this close to the fact's last mention is local
NEEDED_KEYS = ("tokens", "bits", "scored", "start_of_sequence")


def _document_rows(losses: dict) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, target bits, target scored) per document, in stream order: target_bits[t] is the loss of
    *predicting* token t (the loss of token t is computed at position t - 1)."""
    tokens, bits, scored, starts = (losses[k] for k in NEEDED_KEYS)
    batches, rows, n = tokens.shape
    for row in range(rows):
        ids, row_bits, row_scored = tokens[:, row].reshape(-1), bits[:, row].reshape(-1), scored[:, row].reshape(-1)
        bounds = [k * n for k in range(batches) if starts[k, row]] + [batches * n]
        for a, z in zip(bounds[:-1], bounds[1:]):
            target_bits = np.concatenate([[0.0], row_bits[a:z - 1]])
            target_scored = np.concatenate([[False], row_scored[a:z - 1].astype(bool)])
            yield ids[a:z], target_bits, target_scored


def documents(losses: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(text, bits, scored) per document, in stream order, for the bytes vocabulary: character t is token t."""
    found = []
    for ids, target_bits, target_scored in _document_rows(losses):
        text = bytes(int(i) - BYTE_OFFSET if BYTE_OFFSET <= i < 256 + BYTE_OFFSET else 32
                     for i in ids).decode("latin-1")
        found.append((text, target_bits, target_scored))
    return found


def token_texts(vocabulary: Vocabulary) -> Callable[[int], str]:
    """id -> the text that id adds to a decoded sequence (its leading space included, which decoding one
    SentencePiece piece alone would drop): decode(anchor + [id]) less decode(anchor), cached per id."""
    anchor = list(vocabulary.encode("a"))
    before = vocabulary.decode(anchor)
    cache: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in cache:
            if token_id == vocabulary.pad_id:
                cache[token_id] = ""
            else:
                after = vocabulary.decode(anchor + [token_id])
                cache[token_id] = after[len(before):] if after.startswith(before) else vocabulary.decode([token_id])
        return cache[token_id]

    return text


def token_documents(losses: dict, vocabulary: Vocabulary
                    ) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(text, starts, ends, bits, scored) per document: the text built piece by piece, token t's text
    being text[starts[t]:ends[t]] (empty for padding), so that a character span maps back to tokens."""
    text_of = token_texts(vocabulary)
    found = []
    for ids, target_bits, target_scored in _document_rows(losses):
        pieces = [text_of(int(i)) for i in ids]
        ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
        starts = ends - np.asarray([len(p) for p in pieces], dtype=np.int64)
        found.append(("".join(pieces), starts, ends, target_bits, target_scored))
    return found


def covering_tokens(starts: np.ndarray, ends: np.ndarray, start: int, end: int) -> list[int]:
    """The tokens whose text shares a character with [start, end), in order: the first covers `start`."""
    lo = int(np.searchsorted(ends, start, side="right"))  # the first token ending after `start`
    hi = int(np.searchsorted(starts, end, side="left"))  # the first token starting at or after `end`
    return [t for t in range(lo, hi) if ends[t] > starts[t]]


def mention_kind(text: str, at: int) -> str:
    """Stated, read-back or far recall: the kind of the prose-ledger value starting at `at`, told by its
    own sentence, which holds whether newlines survive (bytes) or become spaces (SentencePiece): a
    statement is "The code of X is ..." or "X lives in ..."; a recall says "the code of" after a lead,
    or "X still lives in"."""
    sentence_start = max(text.rfind(". ", 0, at) + 2, text.rfind("\n", 0, at) + 1)
    if text.startswith("Read back", sentence_start):
        return "read-back"
    if STATED.fullmatch(text, sentence_start, at):
        return "stated"
    return "far recall"


def line_mentions(pattern: re.Pattern, text: str, near: int) -> Iterator[tuple[str, int, int]]:
    """(kind, start, end) of every lines-layout value: stated, read-back within `near` characters of the
    fact's last mention, or far recall."""
    last: dict[str, int] = {}
    for match in pattern.finditer(text):
        name, start = match.group(1), match.start(3)
        if match.group(2) == ": ":
            kind = "stated"
        else:
            kind = "read-back" if start - last.get(name, start - near) < near else "far recall"
        yield (kind, *match.span(3))
        last[name] = start


def is_bytes(vocabulary: Vocabulary | None) -> bool:
    """No vocabulary (nothing named one) or the `bytes` one: each token is a character."""
    return vocabulary is None or getattr(vocabulary, "name", None) == "bytes"


def copy_table(losses: dict, vocabulary: Vocabulary | None = None, near: int = NEAR
               ) -> dict[str, dict[str, tuple[float, int]]]:
    """kind -> {"first": (mean bits, tokens), "rest": (...)} over every value mention; the first
    character's token (bytes) or the first token covering the value (any other vocabulary) apart."""
    sums: dict[str, dict[str, list[float]]] = {}

    def add(kind: str, tokens: Sequence[int], bits, scored) -> None:
        parts = sums.setdefault(kind, {"first": [], "rest": []})
        for part, chosen in (("first", tokens[:1]), ("rest", tokens[1:])):
            parts[part].extend(bits[t] for t in chosen if scored[t])

    if is_bytes(vocabulary):
        for text, bits, scored in documents(losses):
            for match in VALUE.finditer(text):
                add(mention_kind(text, match.start(1)), range(*match.span(1)), bits, scored)
            for kind, start, end in line_mentions(LINE, text, near):
                add(kind, range(start, end), bits, scored)
    else:
        for text, starts, ends, bits, scored in token_documents(losses, vocabulary):
            for match in VALUE.finditer(text):
                add(mention_kind(text, match.start(1)), covering_tokens(starts, ends, *match.span(1)), bits,
                    scored)
            for kind, start, end in line_mentions(SENTENCE_LINE, text, near):
                add(kind, covering_tokens(starts, ends, start, end), bits, scored)
    return {kind: {part: (float(np.mean(v)) if v else float("nan"), len(v)) for part, v in parts.items()}
            for kind, parts in sums.items()}


def default_near(data_config: DataConfig) -> int:
    """`NEAR`, or the run's `min_recall_distance` when its read-backs may reach further back than `NEAR`
    (`read_back_distance` > 0: a fact stated up to that far back and up to three statements before)."""
    options = data_config.options or {}
    if options.get("layout") == "lines" and int(options.get("read_back_distance") or 0) > 0:
        return int(options.get("min_recall_distance", 512))
    return NEAR


def run_recipe(source: str, workdir: bool) -> Recipe:
    """The validated recipe of a run (its newest checkpoint's manifest) or of a recipe file or name;
    ValueError with one line when there is none."""
    from meliad_core import checkpoint as ckpt

    if os.path.isdir(source):
        found = ckpt.latest_valid_checkpoint(Path(source), warn=lambda message: None)
        if found is None:
            raise ValueError("no valid checkpoint (is it a finished run's workdir?)")
        try:
            return ckpt.stored_recipe(*found[:2])
        except ckpt.CheckpointError as exc:
            raise ValueError(str(exc)) from None
    if workdir:
        raise ValueError("no such directory (expected a finished run's workdir)")
    from meliad_core.recipes import load_recipe

    return load_recipe(source, check_plugins=False)


def load_run_vocabulary(source: str, workdir: bool) -> tuple[Vocabulary, DataConfig]:
    """(vocabulary, data config) of `source`; ValueError with one line (no checkpoint, bad recipe, a
    vocabulary file that does not exist, a vocabulary plugin that is not installed)."""
    from meliad_core.plugins import PluginError
    from meliad_core.vocab import load_vocabulary

    recipe = None
    try:
        recipe = run_recipe(source, workdir)
        return load_vocabulary(recipe.data), recipe.data
    except (ValueError, PluginError) as exc:  # RecipeError is a ValueError
        message = _first_line(exc)
        path = (recipe.data.options or {}).get("vocabulary_path") if recipe is not None else None
        if isinstance(path, str) and not os.path.isabs(path) and not os.path.exists(path):
            message += f" (a relative path is read from the working directory, {os.getcwd()})"
        raise ValueError(message) from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__


def read_losses(path: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz written by `meliad eval --token-losses`; ValueError with one line."""
    expected = "expected an .npz from `meliad eval --token-losses`"
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: not an .npz archive ({expected})")
        with loaded:
            losses = dict(loaded)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        reason = _first_line(exc)
        raise ValueError(reason if reason.startswith(f"{path}: ") else f"{path}: cannot be read ({reason}; {expected})"
                         ) from None
    missing = [key for key in NEEDED_KEYS if key not in losses]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} array ({expected}, with {', '.join(NEEDED_KEYS)})")
    shape = losses["tokens"].shape
    if (len(shape) != 3 or losses["bits"].shape != shape or losses["scored"].shape != shape
            or losses["start_of_sequence"].shape != shape[:2]):
        raise ValueError(f"{path}: tokens, bits and scored must be (batches, rows, length) arrays of one shape and "
                         f"start_of_sequence (batches, rows); got tokens of shape {shape}")
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", help="a finished ledgers run (evaluated with `meliad eval`)")
    parser.add_argument("--losses", help="an .npz written by `meliad eval --token-losses` instead")
    parser.add_argument("--recipe", metavar="WORKDIR_OR_YAML",
                        help="with --losses: the run (its checkpoint's recipe) or recipe whose vocabulary wrote the "
                             "ids (default: the bytes vocabulary)")
    parser.add_argument("--near", type=int, metavar="CHARS",
                        help=f"lines layout: a read-back closer than this to the fact's last mention is local "
                             f"(default {NEAR}, or the run's min_recall_distance when it sets read_back_distance)")
    parser.add_argument("--batches", type=int, default=24, help="eval batches to score (default 24)")
    args = parser.parse_args(argv)
    if (args.workdir is None) == (args.losses is None):
        parser.error("give a WORKDIR or --losses FILE.npz (one of them)")
    if args.recipe is not None and args.workdir is not None:
        parser.error("--recipe goes with --losses (a WORKDIR's own recipe is used)")
    if args.near is not None and args.near < 1:
        parser.error(f"--near: got {args.near}, expected a positive number of characters")
    vocabulary, near = None, NEAR
    source = args.workdir if args.workdir is not None else args.recipe
    if source is not None:
        try:
            vocabulary, data_config = load_run_vocabulary(source, workdir=args.workdir is not None)
        except ValueError as exc:
            print(f"{source}: {exc}", file=sys.stderr)
            return 1
        near = default_near(data_config)
    if args.near is not None:
        near = args.near
    path = args.losses
    if path is None:
        path = os.path.join(tempfile.mkdtemp(prefix="copy_probe-"), "losses.npz")
        command = [sys.executable, "-m", "meliad_core.cli", "eval", args.workdir, "--batches", str(args.batches),
                   "--token-losses", path]
        if subprocess.run(command).returncode != 0:
            return 1
    if not os.path.isfile(path):
        parser.error(f"--losses: {path} does not exist")
    try:
        losses = read_losses(path)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    table = copy_table(losses, vocabulary, near)
    if not table:
        if is_bytes(vocabulary):
            print("no fact values found: is this a synthetic-ledgers run with the bytes vocabulary? (another "
                  "vocabulary: name its run or recipe with --recipe)", file=sys.stderr)
        else:
            print(f"no fact values found: is this a synthetic-ledgers run with the {vocabulary.name} vocabulary?",
                  file=sys.stderr)
        return 1
    label = "first character" if is_bytes(vocabulary) else "first token"
    print(f"| mention | {label}, bits | tokens | rest of the value, bits | tokens |")
    print("|---|---|---|---|---|")
    order = [kind for kind in ("stated", "read-back", "far recall") if kind in table]
    for kind in order:
        (first, n_first), (rest, n_rest) = table[kind]["first"], table[kind]["rest"]
        print(f"| {kind} | {first:.3f} | {n_first} | {rest:.3f} | {n_rest} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
