"""The `text_files` source: documents from UTF-8 text files.

Options (`data.options`):
    paths          a glob or a list of globs (`**` matches folders recursively; `~` is expanded;
                   relative paths are relative to the working directory). Required.
    separator      optional string: each file is split on it into several documents (empty or
                   whitespace-only pieces are dropped); otherwise one document per file.
    eval_paths     a glob or a list of globs naming the eval files; they are left out of train.
    eval_fraction  otherwise, the fraction of the files (at least one, never all) set aside for eval,
                   chosen by a hash of the file name (deterministic, independent of the run seed).
    split_bytes    [train, valid, test]: three positive byte counts that cut the ONE file `paths`
                   matches into consecutive ranges: train = bytes [0, train), valid = the next `valid`
                   bytes, test = the `test` bytes after those; bytes past the three are unused. This
                   is the standard enwik8 split (90M/5M/5M) that meliad's enwik8_train/enwik8_test
                   files hold. Excludes eval_paths and eval_fraction.
    eval_part      with split_bytes: the range the eval split reads, `test` (default: meliad evaluates
                   on its "test" split, the last 5M bytes of enwik8) or `valid`.
    article_start  optional string that starts each document: a file (or a split_bytes range) is cut
                   just before every occurrence, which stays at the start of its document; the text
                   before the first occurrence is a document of its own (enwik8: "<page>"). Excludes
                   separator.
    merge_articles with article_start: merge consecutive articles while the merged text, from the
                   start of its first article, is at most data.segment_length bytes; the text before
                   the first occurrence is merged into the first group (meliad's
                   text_dataset.merge_articles, which enwik8 always used). Default false.
    chunk_bytes    beyond meliad: cut every document (a file, an article, a split_bytes range) into
                   consecutive pieces, each ending at the first line end at or after this many bytes
                   (the last piece takes the rest), each a document of its own. A few long books then
                   give many document starts, so the first segments of an eval set are more than one
                   book's opening (docs/long_range.md). Excludes separator; null: off (the default).
Without `eval_paths`, `eval_fraction` or `split_bytes` the eval split reads the same files as train (with
a warning). Files are decoded as UTF-8; undecodable bytes become U+FFFD (so does a character that a
split_bytes boundary cuts in two). The split is by file or by byte range, so no text is in both splits.

Decision: meliad measured the merge limit in characters of its text-mode read; here it is in bytes of
the file, which is what data.segment_length counts with the bytes vocabulary (the same for ASCII text).
A file or range without any `article_start` is one document (meliad's enwik8 loader would have yielded
nothing).
"""

from __future__ import annotations

import collections.abc
import glob
import os
import re
import warnings
import zlib
from pathlib import Path

from meliad_core.config import RecipeError

from ._options import get_bool, get_float, get_int, get_str, get_str_list

OPTIONS = ("paths", "separator", "eval_paths", "eval_fraction", "split_bytes", "eval_part", "article_start",
           "merge_articles", "chunk_bytes")
EVAL_PARTS = ("test", "valid")


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


# ------------------------------------------------------------------------------------------------
# Articles by byte offsets (enwik8)


def merge_articles(articles: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """meliad's merge: `articles` are consecutive (start, end) byte spans of one text that starts at 0.
    A group grows by the next article while (its end − the group's start) <= `limit`; the first group
    starts at 0, so the text before the first article belongs to it (or, if the first article alone is
    too long to join it, is a group of its own)."""
    merged: list[tuple[int, int]] = []
    start, end = 0, None
    for s, e in articles:
        if end is None:
            end = s  # the group so far: the text before the first article
        if e - start > limit:
            if end > start:
                merged.append((start, end))
            start, end = s, e
        else:
            end = e
    if end is not None and end > start:
        merged.append((start, end))
    return merged


def article_spans(data: bytes, marker: bytes, merge_limit: int | None = None) -> list[tuple[int, int]]:
    """(start, end) byte spans of the documents of `data`, cut before every `marker` (see the module
    docstring); merged as meliad did when `merge_limit` is given. Together they cover `data` exactly."""
    starts = [m.start() for m in re.finditer(re.escape(marker), data)]
    if not starts:
        return [(0, len(data))] if data else []
    articles = list(zip(starts, starts[1:] + [len(data)]))
    if merge_limit is not None:
        return merge_articles(articles, merge_limit)
    return ([(0, starts[0])] if starts[0] > 0 else []) + articles


class ByteSpans(collections.abc.Sequence):
    """Documents given as byte spans of files: `spans` is a list of (file, start, end); a document is
    read from disk when asked for, so a large file is never held as text."""

    def __init__(self, spans: list[tuple[str, int, int]]):
        self.spans = [(f, s, e) for f, s, e in spans if e > s]

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        path, start, end = self.spans[index]
        with open(path, "rb") as handle:
            handle.seek(start)
            return handle.read(end - start).decode("utf-8", errors="replace")


def _read_range(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(start)
        return handle.read(end - start)


def chunk_spans(data: bytes, size: int) -> list[tuple[int, int]]:
    """(start, end) spans cutting `data` after the first line end at or after every `size` bytes;
    together they cover `data` exactly."""
    spans, start = [], 0
    while start < len(data):
        line_end = data.find(b"\n", start + size - 1)
        end = len(data) if line_end < 0 else line_end + 1
        spans.append((start, end))
        start = end
    return spans


def _spans_of(path: str, start: int, end: int, marker: bytes | None, merge_limit: int | None,
              chunk: int | None = None):
    if marker is None and chunk is None:
        return [(path, start, end)]
    data = _read_range(path, start, end)
    pieces = article_spans(data, marker, merge_limit) if marker is not None else [(0, len(data))]
    if chunk is not None:
        pieces = [(s + cs, s + ce) for s, e in pieces for cs, ce in chunk_spans(data[s:e], chunk)]
    return [(path, start + s, start + e) for s, e in pieces]


def get_split_bytes(options: dict) -> tuple[int, int, int] | None:
    value = options.get("split_bytes")
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise RecipeError(f"data.options.split_bytes: got {value!r}, expected three positive byte counts "
                          "[train, valid, test]")
    return tuple(value)


def byte_ranges(path: str, sizes: tuple[int, int, int]) -> dict[str, tuple[int, int]]:
    """{"train", "valid", "test"} -> [start, end) byte range of `path` for split_bytes `sizes`."""
    total = os.path.getsize(path)
    if sum(sizes) > total:
        raise RecipeError(f"data.options.split_bytes: got {list(sizes)} ({sum(sizes)} bytes), but {path} has "
                          f"{total} bytes; expected at most that many")
    a, b, c = sizes
    return {"train": (0, a), "valid": (a, a + b), "test": (a + b, a + b + c)}


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


def _open_split_bytes(options: dict, split: str, sizes, marker, merge_limit, chunk) -> ByteSpans:
    for other in ("eval_paths", "eval_fraction"):
        if other in options:
            raise RecipeError(f"data.options.{other}: give either split_bytes or {other}, not both")
    files = _expand(get_str_list(options, "paths", required=True, what="a glob or a list of globs"), "paths")
    if len(files) != 1:
        raise RecipeError(f"data.options.paths: matches {len(files)} files, expected exactly one with "
                          "data.options.split_bytes")
    eval_part = get_str(options, "eval_part", "test")
    if eval_part not in EVAL_PARTS:
        raise RecipeError(f"data.options.eval_part: got {eval_part!r}, expected one of {', '.join(EVAL_PARTS)}")
    start, end = byte_ranges(files[0], sizes)["train" if split == "train" else eval_part]
    return ByteSpans(_spans_of(files[0], start, end, marker, merge_limit, chunk))


def open_text_files(data_config, split: str, seed: int):
    """Factory for the `text_files` source; `seed` is unused (the stream shuffles the Sequence)."""
    options = data_config.options or {}
    separator = get_str(options, "separator", None, what="a non-empty string")
    if separator == "":
        raise RecipeError("data.options.separator: got '', expected a non-empty string")
    marker = get_str(options, "article_start", None, what="a non-empty string")
    if marker == "":
        raise RecipeError("data.options.article_start: got '', expected a non-empty string")
    if marker is not None and separator is not None:
        raise RecipeError("data.options.article_start: give either separator or article_start, not both")
    merge = get_bool(options, "merge_articles", False)
    if merge and marker is None:
        raise RecipeError("data.options.merge_articles: got true, expected data.options.article_start to be set")
    marker_bytes = marker.encode("utf-8") if marker is not None else None
    merge_limit = data_config.segment_length if merge else None
    chunk = get_int(options, "chunk_bytes", 1, minimum=1) if options.get("chunk_bytes") is not None else None
    if chunk is not None and separator is not None:
        raise RecipeError("data.options.chunk_bytes: give either separator or chunk_bytes, not both")
    sizes = get_split_bytes(options)
    if sizes is None and "eval_part" in options:
        raise RecipeError("data.options.eval_part: only read with data.options.split_bytes")
    if sizes is not None:
        if separator is not None:
            raise RecipeError("data.options.separator: not read with split_bytes; use article_start")
        return _open_split_bytes(options, split, sizes, marker_bytes, merge_limit, chunk)
    train_files, eval_files = split_files(options)
    if split == "eval" and eval_files is train_files:
        warnings.warn("text_files: no data.options.eval_paths or eval_fraction; the eval split reads the "
                      "training files", stacklevel=2)
    files = train_files if split == "train" else eval_files
    if marker_bytes is not None or chunk is not None:
        return ByteSpans([span for f in files for span in _spans_of(f, 0, os.path.getsize(f), marker_bytes,
                                                                    merge_limit, chunk)])
    return TextFiles(files, separator)


open_text_files.options = OPTIONS
