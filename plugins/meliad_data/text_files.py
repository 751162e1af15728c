"""The `text_files` source: documents from UTF-8 text files.

Options (`data.options`):
    paths          a glob or a list of globs (`**` matches folders recursively; `~` is expanded;
                   relative paths are relative to the working directory). Required.
    separator      optional string: each file is split on it into several documents (empty or
                   whitespace-only pieces are dropped); otherwise one document per file.
    eval_paths     a glob or a list of globs naming the eval files; they are left out of train.
    eval_fraction  otherwise, the fraction of the files (at least one, never all) set aside for eval,
                   chosen by a hash of the file name (deterministic, independent of the run seed).
Without `eval_paths` or `eval_fraction` the eval split reads the same files as train (with a warning).
Files are decoded as UTF-8; undecodable bytes become U+FFFD. The split is always by file, so the pieces
of one file never end up in both splits.
"""

from __future__ import annotations

import collections.abc
import glob
import os
import warnings
import zlib
from pathlib import Path

from meliad_core.config import RecipeError

from ._options import get_float, get_str, get_str_list

OPTIONS = ("paths", "separator", "eval_paths", "eval_fraction")


def _expand(patterns: list[str], key: str) -> list[str]:
    files: set[str] = set()
    for pattern in patterns:
        matches = [m for m in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(m)]
        if not matches:
            raise RecipeError(f"data.options.{key}: no file matches {pattern!r} "
                              f"(relative to {os.getcwd()})")
        files.update(os.path.normpath(os.path.abspath(m)) for m in matches)
    return sorted(files)


def _read(path: str) -> str:
    return Path(path).read_bytes().decode("utf-8", errors="replace")


class TextFiles(collections.abc.Sequence):
    """Documents of a list of files: one per file, or one per non-blank piece between separators."""

    def __init__(self, files: list[str], separator: str | None = None):
        self.files = list(files)
        self.separator = separator or None
        self._cached: tuple[int, list[str]] | None = None
        if self.separator is None:
            self._index = [(f, 0) for f in range(len(self.files))]
        else:
            self._index = []
            for f in range(len(self.files)):
                self._index.extend((f, p) for p in range(len(self._pieces(f))))

    def _pieces(self, f: int) -> list[str]:
        if self._cached is None or self._cached[0] != f:
            text = _read(self.files[f])
            self._cached = (f, [p for p in text.split(self.separator) if p.strip()])
        return self._cached[1]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        f, piece = self._index[index]
        if self.separator is None:
            return _read(self.files[f])
        return self._pieces(f)[piece]


def split_files(options: dict) -> tuple[list[str], list[str]]:
    """(train files, eval files) from the options."""
    files = _expand(get_str_list(options, "paths", required=True, what="a glob or a list of globs"), "paths")
    eval_patterns = get_str_list(options, "eval_paths", what="a glob or a list of globs")
    fraction = get_float(options, "eval_fraction", 0.0, 0.0, 1.0)
    if eval_patterns and "eval_fraction" in options:
        raise RecipeError("data.options.eval_fraction: give either eval_paths or eval_fraction, not both")
    if eval_patterns:
        eval_files = _expand(eval_patterns, "eval_paths")
        train_files = [f for f in files if f not in set(eval_files)]
        if not train_files:
            raise RecipeError("data.options.eval_paths: every file of data.options.paths is an eval file; "
                              "expected some left for train")
        return train_files, eval_files
    if fraction > 0:
        if len(files) < 2:
            raise RecipeError(f"data.options.eval_fraction: got {fraction}, but data.options.paths matches "
                              f"{len(files)} file; expected at least 2 to split")
        count = min(len(files) - 1, max(1, round(fraction * len(files))))
        ranked = sorted(files, key=lambda f: (zlib.crc32(os.path.basename(f).encode("utf-8")), f))
        chosen = set(ranked[:count])
        return [f for f in files if f not in chosen], [f for f in files if f in chosen]
    return files, files


def open_text_files(data_config, split: str, seed: int) -> TextFiles:
    """Factory for the `text_files` source; `seed` is unused (the stream shuffles the Sequence)."""
    options = data_config.options or {}
    separator = get_str(options, "separator", None, what="a non-empty string")
    if separator == "":
        raise RecipeError("data.options.separator: got '', expected a non-empty string")
    train_files, eval_files = split_files(options)
    if split == "eval" and eval_files is train_files:
        warnings.warn("text_files: no data.options.eval_paths or eval_fraction; the eval split reads the "
                      "training files", stacklevel=2)
    return TextFiles(train_files if split == "train" else eval_files, separator)


open_text_files.options = OPTIONS
