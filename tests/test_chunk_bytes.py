"""`data.options.chunk_bytes`: long files cut into many documents at line ends, so a few books give
many document starts (docs/long_range.md, the books demos)."""

from __future__ import annotations

import random

import pytest

from meliad_core import data
from meliad_core.config import DataConfig, RecipeError
from meliad_data.text_files import chunk_spans


def _text(seed: int, lines: int) -> bytes:
    rng = random.Random(seed)
    words = ("river", "lamp", "Buck", "ölfarbe", "the", "a", "snow", "Achilles")
    return "".join(" ".join(rng.choice(words) for _ in range(rng.randint(0, 14))) + "\n"
                   for _ in range(lines)).encode("utf-8")


@pytest.mark.parametrize("size", [1, 7, 64, 500, 10_000])
def test_chunks_cover_the_text_and_end_at_line_ends(size):
    for seed in range(5):
        text = _text(seed, 80) + b"no final newline"
        spans = chunk_spans(text, size)
        assert b"".join(text[s:e] for s, e in spans) == text
        assert all(e > s for s, e in spans)
        assert [s for s, _ in spans[1:]] == [e for _, e in spans[:-1]]
        for s, e in spans[:-1]:
            piece = text[s:e]
            assert piece.endswith(b"\n") and len(piece) >= size
            assert b"\n" not in piece[size - 1:-1]  # cut at the FIRST line end at or after size bytes
    assert chunk_spans(b"", 10) == []


def _books(tmp_path, count=3):
    for i in range(count):
        (tmp_path / f"book{i}.txt").write_bytes(_text(i, 300))
    return str(tmp_path / "*.txt")


def test_every_document_is_cut_and_the_split_stays_by_file(tmp_path):
    paths = _books(tmp_path)
    whole = {"paths": paths, "eval_fraction": 0.34}
    cut = {**whole, "chunk_bytes": 400}
    for split in ("train", "eval"):
        books = list(data.open_documents(DataConfig(source="text_files", options=whole), split))
        pieces = list(data.open_documents(DataConfig(source="text_files", options=cut), split))
        assert len(pieces) > 3 * len(books)
        assert "".join(pieces) == "".join(books)  # same files, same order, nothing lost or shared
        assert sum(len(p.encode("utf-8")) < 400 for p in pieces) <= len(books)  # only a book's last piece
    train = "".join(data.open_documents(DataConfig(source="text_files", options=cut), "train"))
    held = "".join(data.open_documents(DataConfig(source="text_files", options=cut), "eval"))
    assert held and train and held not in train


def test_null_chunk_bytes_is_off(tmp_path):
    """A recipe that includes one with chunk_bytes (books_xl) switches it off with null."""
    options = {"paths": _books(tmp_path, 2)}
    whole = list(data.open_documents(DataConfig(source="text_files", options=options), "train"))
    off = list(data.open_documents(DataConfig(source="text_files", options={**options, "chunk_bytes": None}),
                                   "train"))
    assert len(whole) == 2 and off == whole


def test_chunks_apply_within_articles(tmp_path):
    path = tmp_path / "wiki"
    path.write_bytes(b"<page>" + _text(1, 40) + b"<page>" + _text(2, 40))
    options = {"paths": str(path), "article_start": "<page>"}
    articles = list(data.open_documents(DataConfig(source="text_files", options=options), "train"))
    pieces = list(data.open_documents(DataConfig(source="text_files", options={**options, "chunk_bytes": 100}),
                                      "train"))
    assert len(articles) == 2 and len(pieces) > 4
    assert sum(p.startswith("<page>") for p in pieces) == 2  # no piece spans two articles
    assert "".join(pieces) == "".join(articles)


@pytest.mark.parametrize("extra, pattern", [
    ({"chunk_bytes": 0}, r"^data\.options\.chunk_bytes: got 0, expected an integer >= 1$"),
    ({"chunk_bytes": "4k"}, r"^data\.options\.chunk_bytes: got '4k', expected an integer >= 1$"),
    ({"chunk_bytes": True}, r"^data\.options\.chunk_bytes: got True, expected an integer >= 1$"),
    ({"chunk_bytes": 100, "separator": "\n\n"}, r"^data\.options\.chunk_bytes: give either separator or"),
])
def test_bad_chunk_options_stop_with_one_line(tmp_path, extra, pattern):
    options = {"paths": _books(tmp_path, 1), **extra}
    with pytest.raises(RecipeError, match=pattern):
        data.open_documents(DataConfig(source="text_files", options=options), "train")
