"""The enwik8 task (spec §9.1): the text_files source cutting one local file into 90M/5M/5M byte ranges,
articles cut before "<page>" and merged as meliad's merge_articles. All on small generated files; the
split sizes are scaled down through data.options."""

from __future__ import annotations

import numpy as np
import pytest

from meliad_core import data, recipes
from meliad_core.config import DataConfig, RecipeError
from meliad_data.text_files import ByteSpans, article_spans, merge_articles

MARKER = b"<page>"


pytestmark = pytest.mark.usefixtures("installed_plugins")


def fake_wiki(pages: int = 60, seed: int = 0) -> bytes:
    """An enwik8-like XML dump (ASCII): a header, then <page> elements of very different lengths."""
    rng = np.random.default_rng(seed)
    words = ["the", "of", "Anarchism", "political", "philosophy", "[[link]]", "{{cite}}", "&amp;", "1911"]
    parts = [b'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.3/">\n  <siteinfo>\n'
             b"    <sitename>Wikipedia</sitename>\n  </siteinfo>\n"]
    for i in range(pages):
        length = int(rng.choice([3, 10, 40, 200]))
        body = " ".join(rng.choice(words, size=length))
        parts.append(f"  <page>\n    <title>Article {i}</title>\n    <text>{body}</text>\n  </page>\n".encode())
    parts.append(b"</mediawiki>\n")
    return b"".join(parts)


def tile(spans, start, end):
    """The (start, end) spans, in order, cover [start, end) exactly: contiguous, no gap, no overlap."""
    spans = sorted(spans)
    assert spans[0][0] == start and spans[-1][1] == end
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(e > s for s, e in spans)


# -- merging, by hand ----------------------------------------------------------------------------------

#             header [0,4)  A [4,12)    B [12,24)       C [24,60)              D [60,67)  E [67,74)
HAND = b"hdr:" + b"<page>ab" + b"<page>cdefgh" + b"<page>" + b"x" * 30 + b"<page>z" + b"<page>y"


def test_articles_are_cut_before_each_marker():
    assert len(HAND) == 74
    assert article_spans(HAND, MARKER) == [(0, 4), (4, 12), (12, 24), (24, 60), (60, 67), (67, 74)]
    assert article_spans(b"<page>a<page>b", MARKER) == [(0, 7), (7, 14)]  # no header
    assert article_spans(b"no marker at all", MARKER) == [(0, 16)]
    assert article_spans(b"", MARKER) == []


def test_merge_by_hand():
    # limit 20: the header joins A ([0,12) is 12 <= 20); B would make [0,24), 24 > 20: new group; C alone
    # exceeds the limit and stays whole; D and E fit together ([60,74) is 14).
    assert article_spans(HAND, MARKER, merge_limit=20) == [(0, 12), (12, 24), (24, 60), (60, 74)]
    # limit 10: A cannot join the header ([0,12) is 12), so the header is a group of its own.
    assert article_spans(HAND, MARKER, merge_limit=10) == [(0, 4), (4, 12), (12, 24), (24, 60), (60, 67), (67, 74)]
    # a limit the whole text fits in: one group
    assert article_spans(HAND, MARKER, merge_limit=74) == [(0, 74)]
    assert article_spans(HAND, MARKER, merge_limit=73) == [(0, 67), (67, 74)]
    # the first group starts at 0 (the text before the first article belongs to it), and a group is
    # measured from its start: [0,24) fits 48; [0,60) does not; [24,67) is 43 and does
    assert merge_articles([(12, 24), (24, 60), (60, 67)], 48) == [(0, 24), (24, 67)]


def test_merged_groups_are_maximal_and_cover_the_text():
    text = fake_wiki()
    limit = 256
    groups = article_spans(text, MARKER, merge_limit=limit)
    articles = article_spans(text, MARKER)
    tile(groups, 0, len(text))
    starts = {s for s, _ in articles}
    first_end = dict(articles)  # article start -> end
    for (s, e), following in zip(groups, groups[1:] + [None]):
        assert s == 0 or s in starts  # groups start at an article
        inner = [a for a in starts if s < a < e]
        assert e - s <= limit or not inner, (s, e)  # over the limit only as a single article
        if following is not None:  # the next article would not have fitted
            assert first_end[following[0]] - s > limit
    assert len(groups) < len(articles)


# -- the byte-range split -----------------------------------------------------------------------------


@pytest.fixture
def wiki_file(tmp_path):
    text = fake_wiki(pages=120)
    path = tmp_path / "enwik8"
    path.write_bytes(text)
    return path, text


def enwik8_config(path, sizes, segment_length=64, **options):
    return DataConfig(source="text_files", segment_length=segment_length, batch_size=2,
                      options={"paths": str(path), "split_bytes": list(sizes), "article_start": "<page>",
                               "merge_articles": True, **options})


def test_split_bytes_gives_exactly_the_requested_ranges(wiki_file):
    path, text = wiki_file
    n = len(text)
    a, b, c = n * 7 // 10, n // 10, n // 10  # leaves n - a - b - c bytes unused at the end
    config = enwik8_config(path, (a, b, c))
    train = data.open_documents(config, "train")
    test = data.open_documents(config, "eval")
    valid = data.open_documents(enwik8_config(path, (a, b, c), eval_part="valid"), "eval")
    for docs, (start, end) in ((train, (0, a)), (valid, (a, a + b)), (test, (a + b, a + b + c))):
        assert isinstance(docs, ByteSpans) and len(docs) > 1
        tile([(s, e) for _, s, e in docs.spans], start, end)
        assert "".join(docs).encode("utf-8") == text[start:end]  # the documents are exactly the range
    train_bytes = {i for _, s, e in train.spans for i in range(s, e)}
    eval_bytes = {i for _, s, e in test.spans for i in range(s, e)}
    assert not train_bytes & eval_bytes and max(train_bytes) < min(eval_bytes)
    # Merged within each range, meliad's way: the range's own start is the group start.
    assert [(s, e) for _, s, e in test.spans] == [
        (a + b + s, a + b + e) for s, e in article_spans(text[a + b:a + b + c], MARKER, merge_limit=64)]


def test_without_merging_every_article_is_a_document(wiki_file):
    path, text = wiki_file
    options = {"paths": str(path), "split_bytes": [len(text) - 20, 10, 10], "article_start": "<page>"}
    train = data.open_documents(DataConfig(source="text_files", options=options), "train")
    assert [(s, e) for _, s, e in train.spans] == article_spans(text[:len(text) - 20], MARKER)
    assert sum(doc.startswith("  <page>") or doc.startswith("<page>") for doc in train) >= len(train) - 2
    assert all(doc.count("<page>") <= 1 for doc in train)


def test_without_article_start_a_range_is_one_document(wiki_file):
    path, text = wiki_file
    options = {"paths": str(path), "split_bytes": [100, 50, 25]}
    config = DataConfig(source="text_files", options=options)
    assert list(data.open_documents(config, "train")) == [text[:100].decode()]
    assert list(data.open_documents(config, "eval")) == [text[150:175].decode()]


def test_non_ascii_text_round_trips(tmp_path):
    text = ("<page>Zürich – 東京 ☃</page>\n" * 3 + "<page>naïve café</page>\n").encode("utf-8")
    path = tmp_path / "wiki"
    path.write_bytes(text)
    size = len(text)
    docs = data.open_documents(enwik8_config(path, (size - 2, 1, 1), segment_length=40), "train")
    assert "".join(docs).encode("utf-8") == text[:size - 2]
    assert docs[0] == "<page>Zürich – 東京 ☃</page>\n"  # 36 bytes: with the next one, 72 > 40
    assert len(docs) == 4


def test_the_stream_reads_only_the_train_range(wiki_file):
    """End to end through the bundled recipe (scaled down with --set): token ids are the bytes + 3 of
    train documents; eval batches come from the test range."""
    path, text = wiki_file
    n = len(text)
    sizes = [n - 2000, 1000, 1000]
    recipe = recipes.load_recipe("tasks/enwik8", [
        f"data.options.paths={path}", f"data.options.split_bytes={sizes}", "data.segment_length=64",
        "attention.window=64", "data.batch_size=2"])
    train_text = text[:sizes[0]]
    test_text = text[sizes[0] + sizes[1]:]
    for split, inside, outside in (("train", train_text, test_text), ("eval", test_text, train_text)):
        stream = data.stream(recipe, split)
        for _ in range(20):
            batch = next(stream)
            for row in batch["tokens"]:
                chunk = bytes((row[row > 0] - 3).astype(np.uint8).tolist())
                assert chunk and chunk in inside, (split, chunk)
                if len(chunk) >= 48:
                    assert chunk not in outside


def test_the_bundled_recipe_has_the_standard_split():
    recipe = recipes.load_recipe("tasks/enwik8")
    assert (recipe.data.source, recipe.data.vocabulary) == ("text_files", "bytes")
    options = recipe.data.options
    assert options["split_bytes"] == [90_000_000, 5_000_000, 5_000_000]
    assert (options["eval_part"], options["article_start"], options["merge_articles"]) == ("test", "<page>", True)
    with pytest.raises(RecipeError, match=r"^data\.options\.paths: no file matches 'enwik8'"):
        data.open_documents(recipe.data, "train")  # a placeholder path: nothing is downloaded


# -- errors: one line naming the option -------------------------------------------------------------


def test_bad_options_stop_with_one_line(wiki_file, tmp_path):
    path, text = wiki_file
    (tmp_path / "other").write_bytes(b"<page>x")
    n = len(text)
    cases = [
        ({"split_bytes": [n, 1, 1]}, r"^data\.options\.split_bytes: got \[%d, 1, 1\] \(%d bytes\), but .* has %d "
         r"bytes; expected at most that many$" % (n, n + 2, n)),
        ({"split_bytes": [10, 10]}, r"^data\.options\.split_bytes: got \[10, 10\], expected three positive"),
        ({"split_bytes": [10, 0, 10]}, r"^data\.options\.split_bytes: got \[10, 0, 10\], expected three positive"),
        ({"split_bytes": [10, 10, 10], "eval_fraction": 0.1}, r"^data\.options\.eval_fraction: give either"),
        ({"split_bytes": [10, 10, 10], "eval_part": "train"}, r"^data\.options\.eval_part: got 'train', expected"),
        ({"split_bytes": [10, 10, 10], "paths": str(tmp_path / "*")},
         r"^data\.options\.paths: matches 2 files, expected exactly one"),
        ({"split_bytes": [10, 10, 10], "separator": "\n"}, r"^data\.options\.separator: not read with split_bytes"),
        ({"eval_part": "valid"}, r"^data\.options\.eval_part: only read with data\.options\.split_bytes"),
        ({"merge_articles": True}, r"^data\.options\.merge_articles: got true, expected data\.options\.article_start"),
        ({"article_start": "<page>", "separator": "\n"}, r"^data\.options\.article_start: give either separator"),
        ({"article_start": ""}, r"^data\.options\.article_start: got '', expected"),
    ]
    for extra, pattern in cases:
        options = {"paths": str(path), **extra}
        with pytest.raises(RecipeError, match=pattern) as caught:
            data.open_documents(DataConfig(source="text_files", options=options), "train")
        assert "\n" not in str(caught.value)
    with pytest.raises(RecipeError, match=r"^data\.options\.split_byte: unknown option .*did you mean "
                                          r"'data\.options\.split_bytes'"):
        data.stream(DataConfig(source="text_files", options={"paths": str(path), "split_byte": [1, 1, 1]}))


def test_article_start_on_whole_files_with_eval_paths(tmp_path):
    """Without split_bytes, article_start cuts every file; the split stays by file."""
    (tmp_path / "a.xml").write_bytes(b"head<page>one<page>two")
    (tmp_path / "b.xml").write_bytes(b"<page>three")
    options = {"paths": str(tmp_path / "*.xml"), "eval_paths": str(tmp_path / "b.xml"), "article_start": "<page>"}
    config = DataConfig(source="text_files", options=options)
    assert list(data.open_documents(config, "train")) == ["head", "<page>one", "<page>two"]
    assert list(data.open_documents(config, "eval")) == ["<page>three"]
    merged = DataConfig(source="text_files", segment_length=13, options={**options, "merge_articles": True})
    assert list(data.open_documents(merged, "train")) == ["head<page>one", "<page>two"]


def test_a_tiny_run_trains_on_enwik8_with_adam_weight_decay_and_exponential_decay(wiki_file, tmp_path):
    """The new keys reach the runner: tiny_test + tasks/enwik8 on the generated file, Adam with weight
    decay and the exponential schedule, two steps; the logged lr is the schedule's."""
    import json
    import math

    import keras

    from meliad_core.runner import run_training

    path, text = wiki_file
    n = len(text)
    (tmp_path / "run.yaml").write_text("name: run\ndescription: tiny enwik8\ninclude: [sizes/tiny_test, tasks/enwik8]\n")
    recipe = recipes.load_recipe(tmp_path / "run.yaml", [
        f"data.options.paths={path}", f"data.options.split_bytes=[{n - 2000}, 1000, 1000]",
        "train.steps=2", "train.warmup=1", "train.checkpoint_every=2", "eval.every=2", "eval.steps=1",
        "train.optimizer=adam", "train.adam.weight_decay=0.01", "train.learning_rate.schedule=exponential",
        "train.learning_rate.max_steps=10"], backend=keras.backend.backend())
    with open(tmp_path / "out.txt", "w", encoding="utf-8") as out:
        run_training(recipe, tmp_path / "work", out=out)
    records = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    assert {"train", "eval"} <= {r["split"] for r in records}
    assert all(math.isfinite(r["bits_per_token"]) for r in records)
    logged = {r["step"]: r["learning_rate"] for r in records if r["split"] == "train"}
    assert logged[2] == pytest.approx(0.05 * 0.01 * 0.1 ** (2 / 10), rel=1e-5)  # base_lr · max · (min/max)^(t/T)
