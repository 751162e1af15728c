"""Data: batching that keeps documents in slots, resumable state, and the built-in sources."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from meliad_core import data
from meliad_core.config import DataConfig, RecipeError, validate_recipe
from meliad_core.data import BatchStream, DataError, Document

from meliad_data.synthetic import SyntheticLedgers, ledger_words
from meliad_data.text_files import TextFiles, split_files
from meliad_vocab import ByteVocabulary

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BYTES = ByteVocabulary()


def make_docs(count: int, seed: int = 0, low: int = 1, high: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    return [f"<{i}>" + "".join(rng.choice(letters, size=rng.integers(low, high))) for i in range(count)]


def take(stream, steps: int) -> list[dict]:
    return [next(stream) for _ in range(steps)]


def slot_documents(batches: list[dict], vocab=BYTES) -> list[list[tuple[int, np.ndarray]]]:
    """Per slot: the (epoch, token ids) of each document it held, re-assembled from its segments.

    Every document must begin with start_of_sequence; trailing padding is cut from the last segment.
    """
    B = batches[0]["tokens"].shape[0]
    slots: list[list[tuple[int, list]]] = [[] for _ in range(B)]
    for batch in batches:
        for i in range(B):
            row = batch["tokens"][i]
            if batch["start_of_sequence"][i]:
                slots[i].append((int(batch["epoch"][i]), []))
            else:
                assert slots[i], "a slot began without start_of_sequence"
                assert batch["epoch"][i] == slots[i][-1][0], "epoch changed inside a document"
            slots[i][-1][1].append(row)
    result = []
    for docs in slots:
        assembled = []
        for epoch, rows in docs:
            ids = np.concatenate(rows)
            # padding only at the very end, and only in the last segment
            nz = np.flatnonzero(ids)
            assert len(nz) and nz[-1] >= len(ids) - len(rows[-1])
            assert (ids[:nz[-1] + 1] != 0).all()
            assembled.append((epoch, ids[:nz[-1] + 1]))
        result.append(assembled)
    return result


def doc_index(ids: np.ndarray) -> int:
    return int(re.match(r"<(\d+)>", BYTES.decode(ids)).group(1))


# -- batching ---------------------------------------------------------------------------------------


def test_batch_format():
    stream = BatchStream(make_docs(10), BYTES, batch_size=3, segment_length=16, seed=1)
    batch = next(stream)
    assert set(batch) == {"tokens", "start_of_sequence", "num_chars", "epoch", "long_range"}
    assert batch["tokens"].shape == (3, 16) and batch["tokens"].dtype == np.int32
    assert batch["start_of_sequence"].shape == (3,) and batch["start_of_sequence"].dtype == bool
    assert batch["num_chars"].dtype == np.int32 and batch["epoch"].dtype == np.int32
    assert batch["long_range"].shape == (3, 16) and batch["long_range"].dtype == bool
    assert batch["start_of_sequence"].all()
    inputs = data.keras_inputs(batch)
    assert set(inputs) == {"tokens", "start_of_sequence"}


def test_documents_keep_their_slot_across_epochs():
    docs = make_docs(13)
    N, B = 8, 3
    stream = BatchStream(docs, BYTES, batch_size=B, segment_length=N, seed=7)
    batches = take(stream, 120)
    per_slot = slot_documents(batches)
    drawn: dict[int, list[int]] = {}
    for slot in per_slot:
        for k, (epoch, ids) in enumerate(slot):
            index = doc_index(ids)
            if k < len(slot) - 1:  # (the last one may still be being read)
                assert BYTES.decode(ids) == docs[index]  # the whole document, in order, in one slot
            drawn.setdefault(epoch, []).append(index)
    assert max(drawn) >= 3  # several epochs went by
    for epoch in range(max(drawn)):  # every complete epoch holds each document exactly once
        assert sorted(drawn[epoch]) == list(range(len(docs)))


def test_start_flags_exactly_on_first_segments():
    docs = ["x" * 8, "y" * 9, "z" * 1, "w" * 17, "v" * 16]
    stream = BatchStream(docs, BYTES, batch_size=1, segment_length=8, seed=0, shuffle=False)
    batches = take(stream, 9)
    flags = [bool(b["start_of_sequence"][0]) for b in batches]
    # lengths 8, 9, 1, 17, 16 -> segments 1, 2, 1, 3, 2; then epoch 1 starts again with "x"
    assert flags == [True, True, False, True, True, False, False, True, False]
    assert [int(b["epoch"][0]) for b in batches] == [0] * 9
    assert BYTES.decode(batches[2]["tokens"][0]) == "y"
    assert batches[2]["tokens"][0, 1:].tolist() == [0] * 7  # last chunk zero-padded
    nxt = next(stream)
    assert nxt["start_of_sequence"][0] and nxt["epoch"][0] == 1 and BYTES.decode(nxt["tokens"][0]) == "x" * 8


def test_empty_documents_are_skipped_and_all_empty_is_an_error():
    stream = BatchStream(["", "ab", ""], BYTES, batch_size=2, segment_length=4, seed=0)
    batch = next(stream)
    assert [BYTES.decode(r) for r in batch["tokens"]] == ["ab", "ab"]
    assert batch["epoch"].tolist() == [0, 1]
    with pytest.raises(DataError, match="no non-empty documents"):
        next(BatchStream(["", ""], BYTES, batch_size=1, segment_length=4))
    with pytest.raises(DataError, match="no non-empty documents"):
        next(BatchStream([], BYTES, batch_size=1, segment_length=4))


def test_reshuffle_per_epoch_deterministic_by_seed():
    docs = make_docs(30, low=1, high=5)  # one segment each: the draw order is visible directly

    def order(seed, epochs=3):
        stream = BatchStream(docs, BYTES, batch_size=2, segment_length=16, seed=seed)
        seen = [(int(b["epoch"][i]), doc_index(b["tokens"][i])) for b in take(stream, 15 * epochs) for i in range(2)]
        return [[d for e, d in seen if e == k] for k in range(epochs)]

    a = order(5)
    assert all(sorted(e) == list(range(30)) for e in a)
    assert a[0] != a[1] != a[2]
    assert order(5) == a
    assert order(6)[0] != a[0]
    unshuffled = BatchStream(docs, BYTES, batch_size=1, segment_length=16, shuffle=False)
    assert [doc_index(b["tokens"][0]) for b in take(unshuffled, 30)] == list(range(30))


def test_eval_split_is_shuffled_differently():
    docs = make_docs(30, low=1, high=5)
    train = BatchStream(docs, BYTES, batch_size=1, segment_length=16, seed=5, split="train")
    ev = BatchStream(docs, BYTES, batch_size=1, segment_length=16, seed=5, split="eval")
    assert [b["tokens"].tolist() for b in take(train, 10)] != [b["tokens"].tolist() for b in take(ev, 10)]


def assert_same(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("at", [0, 1, 7, 23, 61])
def test_resume_from_state_is_identical(streamed, at):
    docs = make_docs(11)
    calls = []

    def source(seed):
        calls.append(seed)
        rng = np.random.default_rng(seed)
        return iter([docs[i] for i in rng.permutation(len(docs))])

    def make():
        return BatchStream(source if streamed else docs, BYTES, batch_size=3, segment_length=8, seed=3)

    original = make()
    take(original, at)
    state = json.loads(json.dumps(original.get_state()))
    assert state == original.get_state()
    expected = take(original, 40)
    resumed = make()
    resumed.set_state(state)
    assert_same(take(resumed, 40), expected)
    # the same stream can also be rewound
    original.set_state(state)
    assert_same(take(original, 40), expected)


def test_state_is_small_and_checked():
    stream = BatchStream(make_docs(5), BYTES, batch_size=2, segment_length=8, seed=3)
    take(stream, 3)
    state = stream.get_state()
    assert len(json.dumps(state)) < 400
    assert state["slots"][0] is not None and len(state["slots"]) == 2
    other = BatchStream(make_docs(5), BYTES, batch_size=3, segment_length=8, seed=3)
    with pytest.raises(DataError, match="batch_size"):
        other.set_state(state)
    with pytest.raises(DataError, match="format"):
        stream.set_state({"epoch": 0})
    named = BatchStream(make_docs(5), BYTES, batch_size=2, segment_length=8, seed=3, name="synthetic")
    with pytest.raises(DataError, match="source"):
        named.set_state({**state, "source": "text_files"})
    stream.set_state(None)
    assert stream.get_state()["position"] == 0


def test_streamed_resume_reads_each_epoch_once():
    docs = make_docs(9)
    opened = []

    def source(seed):
        opened.append(seed)
        return iter(docs)

    stream = BatchStream(source, BYTES, batch_size=4, segment_length=8, seed=0)
    take(stream, 25)
    state = stream.get_state()
    epochs = {s[0] for s in state["slots"]}
    opened.clear()
    stream.set_state(state)
    next(stream)
    assert len(opened) <= len(epochs) + 2  # one pass per slot epoch, plus the cursor (maybe a new epoch)


# -- round_robin assignment --------------------------------------------------------------------------


class RecordingDocs(list):
    """A Sequence of documents that records which indices were read."""

    def __init__(self, docs):
        super().__init__(docs)
        self.read: list[int] = []

    def __getitem__(self, index):
        self.read.append(index)
        return super().__getitem__(index)


def round_robin(source, batch_size=4, **kwargs) -> BatchStream:
    return BatchStream(source, BYTES, batch_size=batch_size, segment_length=8, seed=3, assignment="round_robin",
                       **kwargs)


@pytest.mark.parametrize("count", [13, 3])  # more documents than slots, and fewer (each epoch then feeds some slots)
def test_round_robin_slot_k_reads_documents_k_mod_batch(count):
    docs = make_docs(count, low=1, high=30)
    stream = round_robin(docs)
    batches = take(stream, 120)
    order = np.concatenate([stream._order(e) for e in range(200)])  # the epochs' orders laid end to end
    for i, held in enumerate(slot_documents(batches)):
        want = [int(order[k]) for k in range(i, len(order), 4)][:len(held)]
        assert [doc_index(ids) for _, ids in held] == want, i
        assert [epoch for epoch, _ in held] == [k // count for k in range(i, len(order), 4)][:len(held)]


def test_round_robin_rows_read_only_their_documents_and_match_the_full_stream():
    docs = make_docs(17)
    recording = RecordingDocs(docs)
    full, part = round_robin(docs), round_robin(recording)
    part.read_rows(slice(2, 4))
    for _ in range(50):
        a, b = next(full), next(part)
        for key in a:
            np.testing.assert_array_equal(b[key][2:], a[key][2:], err_msg=key)
            assert not np.any(b[key][:2]), key  # the other slots are padding
    orders = {e: full._order(e) for e in range(10)}
    read = set(recording.read)
    mine = {int(orders[e][p]) for e in orders for p in range(len(docs)) if (e * len(docs) + p) % 4 in (2, 3)}
    assert read and read <= mine  # never a document of slots 0 or 1
    state = part.get_state()
    assert state["slots"][:2] == [None, None] and state["slots"][2:] == full.get_state()["slots"][2:]


@pytest.mark.parametrize("at", [0, 9, 40])
def test_round_robin_streamed_source_equals_the_sequence_and_resumes(at):
    docs = make_docs(10)
    opened = []

    def source(seed):
        opened.append(seed)
        return iter(docs)

    sequence, streamed = round_robin(docs, shuffle=False), round_robin(source)
    take(sequence, at), take(streamed, at)
    state = json.loads(json.dumps(streamed.get_state()))
    assert state == sequence.get_state() | {"source": state["source"]}
    expected = take(sequence, 60)
    resumed = round_robin(source)
    resumed.set_state(state)
    assert_same(take(resumed, 60), expected)
    assert_same(take(round_robin(docs, shuffle=False), at + 60)[at:], expected)


def test_round_robin_state_resumes_on_other_rows_and_refuses_other_assignments():
    docs = make_docs(9)
    one = round_robin(docs)
    take(one, 30)
    state = one.get_state()
    expected = take(one, 20)
    halves = [round_robin(docs), round_robin(docs)]
    for rows, half in zip((slice(0, 2), slice(2, 4)), halves):
        half.set_state(state)
        half.read_rows(rows)
    got = [take(half, 20) for half in halves]
    for step, want in enumerate(expected):
        np.testing.assert_array_equal(np.concatenate([got[0][step]["tokens"][:2], got[1][step]["tokens"][2:]]),
                                      want["tokens"])
    shared = BatchStream(docs, BYTES, batch_size=4, segment_length=8, seed=3)
    with pytest.raises(DataError, match="data.assignment 'round_robin', this stream has 'first_free'"):
        shared.set_state(state)
    with pytest.raises(DataError, match="needs data.assignment: round_robin"):
        shared.read_rows(slice(0, 2))


def test_round_robin_skips_empty_documents_and_stops_when_all_are_empty():
    docs = ["", "abc" * 5, "", "", "xyz" * 4]
    stream = round_robin(docs, batch_size=2, shuffle=False)
    for held in slot_documents(take(stream, 30)):
        assert held and all(len(ids) for _, ids in held)
    with pytest.raises(DataError, match="no non-empty document"):
        next(round_robin(["", ""], batch_size=2))
    with pytest.raises(DataError, match="no documents"):
        next(round_robin(lambda seed: iter([]), batch_size=2))


def test_a_failed_step_keeps_the_position():
    docs = ["abcdefgh" * 3, 5, "xyz"]  # the second "document" is not text
    stream = BatchStream(docs, BYTES, batch_size=2, segment_length=8, seed=0, shuffle=False)
    with pytest.raises(TypeError, match="yielded int"):
        next(stream)
    assert stream.get_state()["position"] == 0 and stream.get_state()["slots"] == [None, None]


def test_resume_detects_changed_documents():
    stream = BatchStream(["a" * 20, "b" * 20], BYTES, batch_size=1, segment_length=4, seed=0, shuffle=False)
    take(stream, 2)
    state = stream.get_state()
    changed = BatchStream(["a" * 3, "b" * 20], BYTES, batch_size=1, segment_length=4, seed=0, shuffle=False)
    changed.set_state(state)
    with pytest.raises(DataError, match="segments"):
        next(changed)


def test_num_chars_counts_scored_tokens():
    docs = ["aé" * 7 + "b"]  # 15 characters, 22 bytes
    stream = BatchStream(docs, BYTES, batch_size=1, segment_length=8, seed=0)
    batches = take(stream, 3)
    rows = [b["tokens"][0] for b in batches]
    for b, row in zip(batches, rows):
        assert b["num_chars"][0] == np.count_nonzero(row[1:])  # bytes vocab: one byte per token
    assert [int(b["num_chars"][0]) for b in batches] == [7, 7, 5]  # 22 bytes = 8 + 8 + 6; first of each unscored


def test_long_range_mask_marks_span_tokens():
    text = "facts: K=AB-12 ... é ... K is AB-12."
    start = text.rindex("AB-12")
    doc = Document(text, ((start, start + 5),))
    stream = BatchStream([doc], BYTES, batch_size=1, segment_length=8, seed=0)
    batches = take(stream, -(-len(text.encode()) // 8))
    tokens = np.concatenate([b["tokens"][0] for b in batches])
    mask = np.concatenate([b["long_range"][0] for b in batches])
    assert BYTES.decode(tokens[mask]) == "AB-12"
    assert not mask[tokens == 0].any()


# -- recipes and plugins ---------------------------------------------------------------------------


def test_stream_from_recipe_defaults_to_synthetic_bytes():
    recipe = validate_recipe({"data": {"segment_length": 256, "batch_size": 2}, "attention": {"window": 256},
                              "train": {"seed": 11}})
    stream = data.stream(recipe)
    assert stream.seed == 11 and stream.vocabulary.name == "bytes" and stream.num_documents == 1024
    batch = next(stream)
    assert batch["tokens"].shape == (2, 256) and batch["start_of_sequence"].all()
    assert batch["tokens"].max() < stream.vocabulary.vocab_size
    again = data.stream(recipe)
    assert_same([batch], [next(again)])
    ev = data.stream(recipe, split="eval")
    assert ev.num_documents == 128
    assert not np.array_equal(next(ev)["tokens"], batch["tokens"])
    with pytest.raises(ValueError, match="split"):
        data.stream(recipe, split="test")


def test_unknown_option_is_one_line_with_a_hint():
    cfg = DataConfig(options={"num_documnets": 3})
    with pytest.raises(RecipeError, match=r"^data\.options\.num_documnets: unknown option .*did you mean "
                                          r"'data\.options\.num_documents'"):
        data.stream(cfg)
    with pytest.raises(RecipeError, match=r"data\.options\.document_length: got -1"):
        data.stream(DataConfig(options={"document_length": -1}))
    with pytest.raises(RecipeError, match=r"data\.options\.shuffle"):
        data.stream(DataConfig(options={"shuffle": "yes"}))


def test_plugins_are_registered():
    from meliad_core import plugins

    manager = plugins.get_plugin_manager()
    assert {"synthetic", "text_files", "tfds"} <= set(manager.names("data_source"))
    assert {"bytes", "sentencepiece"} <= set(manager.names("vocabulary"))
    tfds = manager.get("data_source", "tfds")
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        assert "pip install 'meliad[tfds]'" in tfds.unavailable_reason()
        with pytest.raises(plugins.PluginError, match="not available"):
            data.stream(DataConfig(source="tfds", options={"name": "pg19"}))


# -- synthetic ---------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_splits_differ():
    a = SyntheticLedgers("train", 6)
    b = SyntheticLedgers("train", 6)
    assert [d.text for d in a] == [d.text for d in b]
    assert a[3] == b[3] and a[-1] == a[5] and len(a[1:4]) == 3
    ev = SyntheticLedgers("eval", 6)
    assert not {d.text for d in a} & {d.text for d in ev}
    assert SyntheticLedgers("train", 2, corpus_seed=1)[0].text != a[0].text
    with pytest.raises(IndexError):
        a[6]


@pytest.mark.parametrize("index", range(6))
def test_synthetic_long_range_spans_recall_earlier_facts(index):
    distance = 400
    doc = SyntheticLedgers("train", 6, document_length=5000, min_recall_distance=distance)[index]
    text = doc.text
    assert 5000 <= len(text) < 9000
    facts_end = text.index("\n", text.index("These facts"))
    facts = text[:facts_end]
    stated = dict(re.findall(r"The code of (\w+) is ([A-Z]{2}-\d{4})\.", facts))
    stated.update(re.findall(r"(\w+) lives in (\w+)\.", facts))
    assert len(stated) == 6
    assert len(doc.long_range_spans) == 12
    for start, end in doc.long_range_spans:
        value = text[start:end]
        sentence = text[text.rfind(".", 0, start) + 1:start]
        name = re.search(r"(?:code of (\w+) is|(\w+) still lives in) $", sentence)
        assert name, sentence
        assert stated[name.group(1) or name.group(2)] == value  # the value stated for that name
        assert start > facts_end
        previous = text.rfind(value, 0, start)
        assert 0 <= previous and start - previous >= distance  # its last mention is far back


@pytest.mark.parametrize("index", range(4))
def test_synthetic_near_read_backs_are_local_untagged_and_change_nothing_else(index):
    plain = SyntheticLedgers("train", 4, document_length=3000, min_recall_distance=600)[index]
    doc = SyntheticLedgers("train", 4, document_length=3000, min_recall_distance=600, near_recalls=2)[index]
    text = doc.text
    facts_end = text.index("\n", text.index("These facts"))
    stated = dict(re.findall(r"The code of (\w+) is ([A-Z]{2}-\d{4})\.", plain.text))
    stated.update(re.findall(r"(\w+) lives in (\w+)\.", plain.text[:plain.text.index("\n", 40)]))
    statements = re.findall(r"\. (?:The code of \w+ is|\w+ lives in) ", text[:facts_end])  # not read-backs
    backs = list(re.finditer(r"Read back: (?:the code of (\w+) is ([A-Z]{2}-\d{4})|(\w+) still lives in (\w+))\.",
                             text[:facts_end]))
    assert len(backs) == 2 * len(statements) == 2 * 6  # two after each statement
    for m in backs:  # a fact already stated, with its stated value, a few sentences later
        name, value = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        assert stated[name] == value
        assert 0 < m.start() - text.rindex(value, 0, m.start()) < 400
    for start, end in doc.long_range_spans:  # far recalls stay tagged, after the facts, far from every mention
        assert start > facts_end
        assert start - text.rfind(text[start:end], 0, start) >= 600
    assert "Read back" not in plain.text
    assert plain.text == SyntheticLedgers("train", 4, document_length=3000, min_recall_distance=600,
                                          near_recalls=0)[index].text


@pytest.mark.parametrize("index", range(3))
def test_synthetic_value_letters_makes_every_value_a_letter_code_recalled_far(index):
    doc = SyntheticLedgers("train", 3, document_length=3000, min_recall_distance=600, value_letters=12)[index]
    text = doc.text
    facts_end = text.index("\n", text.index("These facts"))
    stated = dict(re.findall(r"The code of (\w+) is (\w+)\.", text[:facts_end]))
    assert len(stated) == 6 and "lives in" not in text
    assert all(re.fullmatch(r"[a-z]{12}", value) for value in stated.values())
    assert doc.long_range_spans
    for start, end in doc.long_range_spans:  # every recalled value is a stated one, far from its last mention
        assert text[start:end] in stated.values() and start > facts_end
        assert start - text.rfind(text[start:end], 0, start) >= 600
    default = SyntheticLedgers("train", 3, document_length=3000, min_recall_distance=600)[index].text
    assert default == SyntheticLedgers("train", 3, document_length=3000, min_recall_distance=600,
                                       value_letters=0)[index].text


@pytest.mark.parametrize("index", range(3))
@pytest.mark.parametrize("value_words", [0, 4])
def test_synthetic_lines_read_facts_back_nearby_and_tag_only_far_recalls(index, value_words):
    doc = SyntheticLedgers("train", 3, document_length=3000, min_recall_distance=700, num_facts=4,
                           recalls_per_fact=2, layout="lines", value_words=value_words)[index]
    text = doc.text
    value = r"[a-z]+(?: [a-z]+){3}" if value_words else r"[a-z]{12}"
    lines = text.splitlines()
    assert lines[0].startswith("The ledger of") and lines[-1] == "Here the ledger ends."
    stated: dict[str, tuple[str, int]] = {}  # name -> (value, line number)
    last: dict[str, int] = {}  # name -> offset of its last mention
    far, near_gaps = [], []
    offset = len(lines[0]) + 1
    for number, line in enumerate(lines[1:-1], 1):
        m = re.fullmatch(rf"(\w+)(: | = )({value})\.", line)
        assert m, line
        name, mark, found = m.groups()
        at = offset + m.start(3)
        if mark == ": ":  # a statement: a new fact
            assert name not in stated
            stated[name] = (found, number)
            if value_words:
                assert all(word in ledger_words() for word in found.split())
        else:  # a read-back: the stated value, a few lines on (local) or far away (tagged)
            assert stated[name][0] == found
            if at - last[name] >= 700:
                far.append((at, at + len(found)))
            else:  # one of the last three facts stated
                assert name in list(stated)[-3:]
                near_gaps.append(number - stated[name][1])
        last[name] = at
        offset += len(line) + 1
    assert sorted(doc.long_range_spans) == far and len(far) == 4 * 2  # exactly the far recalls are tagged
    assert len(set(near_gaps)) > 2  # read back at several distances: no fixed offset
    assert all(text.count(f"\n{name}: ") == 1 for name in stated)


def test_synthetic_lines_read_backs_reach_up_to_the_read_back_distance():
    doc = SyntheticLedgers("train", 2, document_length=6000, min_recall_distance=2500, num_facts=3,
                           recalls_per_fact=1, layout="lines", read_back_distance=400)[1]
    text = doc.text
    stated = {m.group(1): m.start() for m in re.finditer(r"^(\w+): ", text, re.M)}
    far = {a for a, _ in doc.long_range_spans}
    backs = [(m.group(1), m.start()) for m in re.finditer(r"^(\w+) = ([a-z]+)", text, re.M) if m.start(2) not in far]
    gaps = [at - stated[name] for name, at in backs]
    assert min(gaps) < 100 and max(gaps) > 300  # near ones and far ones
    for name, at in backs:  # one of the last three facts stated at least d <= 400 characters back
        d = min(400, at - stated[name])
        assert sum(1 for where in stated.values() if stated[name] < where <= at - d) <= 2


@pytest.mark.parametrize("rate", [0.0, 0.7, 1.0])
def test_synthetic_lines_read_back_rate_sets_how_many_statements_are_read_back(rate):
    doc = SyntheticLedgers("train", 2, document_length=4000, min_recall_distance=1500, num_facts=3,
                           recalls_per_fact=1, layout="lines", read_back_rate=rate)[0]
    far = {a for a, _ in doc.long_range_spans}
    marks = [(m.group(1), m.end() in far) for m in re.finditer(r"^\w+(: | = )", doc.text, re.M)]
    statements = sum(1 for mark, _ in marks if mark == ": ")
    near = sum(1 for mark, is_far in marks if mark == " = " and not is_far)
    assert len(far) == 3  # the far recalls do not depend on the rate
    if rate == 1.0:  # every statement is followed by a read-back (reach 0: one of the last three, itself included)
        assert near == statements
    else:
        assert rate * statements - 8 <= near <= rate * statements + 8  # about `rate` of them


def test_synthetic_corpus_is_the_one_the_recorded_results_used():
    """docs/long_range.md and README quote runs on these documents: options added since (the shared recall
    scheduler, read_back_rate) must leave the default documents byte for byte as they were (commit 1c0fee1)."""
    digest = hashlib.sha256()
    for options in (dict(layout="lines"), dict(layout="lines", value_words=4, read_back_distance=300), {}):
        for doc in SyntheticLedgers("train", 3, document_length=3000, min_recall_distance=700, num_facts=4,
                                    **options):
            digest.update(doc.text.encode())
            digest.update(repr(doc.long_range_spans).encode())
    assert digest.hexdigest() == "22cf50fd40c1dec5245e3bda70c98ce0901f588ad0579d530822bd63cb67de9f"


def test_synthetic_value_words_also_serve_the_prose_layout():
    doc = SyntheticLedgers("train", 2, document_length=2000, min_recall_distance=500, value_words=3)[0]
    stated = dict(re.findall(r"The code of (\w+) is ([a-z ]+)\.", doc.text))
    assert stated and all(len(v.split()) == 3 and all(w in ledger_words() for w in v.split())
                          for v in stated.values())
    assert all(doc.text[a:b] in stated.values() for a, b in doc.long_range_spans)


@pytest.mark.parametrize("options, message", [
    ({"layout": "grid"}, "data.options.layout: got 'grid', expected one of prose, lines"),
    ({"layout": "lines", "near_recalls": 2}, "data.options.near_recalls: only the prose layout"),
    ({"value_words": 2, "value_letters": 5}, "set one of them, not both"),
    ({"read_back_distance": 300}, "data.options.read_back_distance: only the lines layout takes it"),
    ({"read_back_rate": 0.5}, "data.options.read_back_rate: only the lines layout takes it"),
    ({"layout": "lines", "read_back_rate": 1.5}, "data.options.read_back_rate: got 1.5, expected a number in"),
])
def test_synthetic_layout_options_are_checked(options, message):
    cfg = DataConfig(segment_length=16, batch_size=1, options=options)
    with pytest.raises(RecipeError, match=re.escape(message)):
        data.stream(cfg, seed=0)


def test_synthetic_batches_tag_the_recalled_values():
    cfg = DataConfig(segment_length=128, batch_size=2, options={"num_documents": 4, "document_length": 2000,
                                                                 "min_recall_distance": 300})
    stream = data.stream(cfg, seed=0)
    batches = take(stream, 60)
    tokens = np.concatenate([b["tokens"][0] for b in batches])
    mask = np.concatenate([b["long_range"][0] for b in batches])
    assert mask.any()
    starts = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int)])) == 1)
    ends = np.flatnonzero(np.diff(np.concatenate([mask.astype(int), [0]])) == -1) + 1
    for s, e in zip(starts, ends):
        value = BYTES.decode(tokens[s:e])
        assert re.fullmatch(r"[A-Z]{2}-\d{4}|[A-Z][a-z]+", value), value


def test_synthetic_quickstart_has_several_documents_per_slot():
    corpus = data.open_documents(DataConfig())
    lengths = [len(corpus[i].text) for i in range(8)]
    assert all(5000 < n < 9000 for n in lengths)
    assert len(corpus) // 4 >= 8  # B = 4: many documents per slot per epoch


# -- text files --------------------------------------------------------------------------------------


@pytest.fixture
def text_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha one\n===\nalpha two\n===\n \n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("beta", encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text("gamma ñ\n===\ngamma two", encoding="utf-8")
    (tmp_path / "d.md").write_text("not text", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    return tmp_path


def test_text_files_one_document_per_file(text_dir):
    cfg = DataConfig(source="text_files", options={"paths": str(text_dir / "**" / "*.txt")})
    docs = data.open_documents(cfg)
    assert isinstance(docs, TextFiles) and len(docs) == 4
    assert sorted(docs) == sorted(["alpha one\n===\nalpha two\n===\n \n", "beta", "caf\ufffd",
                                   "gamma ñ\n===\ngamma two"])


def test_text_files_separator_and_eval_paths(text_dir):
    options = {"paths": [str(text_dir / "*.txt"), str(text_dir / "sub" / "*.txt")], "separator": "\n===\n",
               "eval_paths": str(text_dir / "sub" / "*.txt")}
    cfg = DataConfig(source="text_files", options=options)
    train = data.open_documents(cfg, "train")
    assert sorted(train) == ["alpha one", "alpha two", "beta", "caf\ufffd"]
    assert list(data.open_documents(cfg, "eval")) == ["gamma ñ", "gamma two"]
    stream = data.stream(DataConfig(source="text_files", segment_length=4, batch_size=2, options=options))
    seen = [BYTES.decode(ids) for slot in slot_documents(take(stream, 30)) for _, ids in slot[:-1]]
    assert len(seen) > 4 and set(seen) == {"alpha one", "alpha two", "beta", "caf\ufffd"}


def test_text_files_eval_fraction_and_errors(text_dir):
    options = {"paths": str(text_dir / "**" / "*.txt"), "eval_fraction": 0.25}
    train, ev = split_files(options)
    assert len(ev) == 1 and len(train) == 3 and not set(train) & set(ev)
    assert split_files(options) == (train, ev)
    with pytest.raises(RecipeError, match=r"^data\.options\.paths: missing"):
        data.open_documents(DataConfig(source="text_files"))
    with pytest.raises(RecipeError, match=r"^data\.options\.paths: no file matches"):
        data.open_documents(DataConfig(source="text_files", options={"paths": str(text_dir / "*.none")}))
    with pytest.raises(RecipeError, match=r"^data\.options\.eval_fraction"):
        data.open_documents(DataConfig(source="text_files", options={"paths": str(text_dir / "b.txt"),
                                                                       "eval_fraction": 0.5}))
    with pytest.warns(UserWarning, match="eval split reads the training files"):
        data.open_documents(DataConfig(source="text_files", options={"paths": str(text_dir / "b.txt")}), "eval")


@pytest.mark.skipif(not (SHARED / "books").is_dir(), reason="../shared/data/books is missing")
def test_text_files_on_the_shared_books_resumes_exactly():
    cfg = DataConfig(source="text_files", segment_length=512, batch_size=2,
                     options={"paths": str(SHARED / "books" / "*.txt"), "eval_fraction": 0.25})
    stream = data.stream(cfg, seed=1)
    assert stream.num_documents == 3
    take(stream, 70)  # past the first book of a slot
    state = stream.get_state()
    expected = take(stream, 5)
    resumed = data.stream(cfg, seed=1)
    resumed.set_state(state)
    assert_same(take(resumed, 5), expected)
    for b in expected:
        assert (b["num_chars"] == np.count_nonzero(b["tokens"][:, 1:], axis=1)).all()


# -- tfds (offline, only where tensorflow_datasets is installed) -------------------------------------


def test_tfds_source_reads_a_local_dataset(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyBooks(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"book_text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(["first book", "second book", "third"]),
                    "test": self._generate_examples(["a test book"])}

        def _generate_examples(self, texts):
            for i, text in enumerate(texts):
                yield i, {"book_text": text}

    TinyBooks(data_dir=str(tmp_path)).download_and_prepare()
    cfg = DataConfig(source="tfds", segment_length=8, batch_size=1,
                     options={"name": "tiny_books", "data_dir": str(tmp_path)})
    opened = data.open_documents(cfg, "train", seed=0)
    assert sorted(opened(0)) == ["first book", "second book", "third"]
    assert list(data.open_documents(cfg, "eval", seed=0)(0)) == ["a test book"]
    stream = data.stream(cfg, seed=0)
    take(stream, 3)
    state = stream.get_state()
    expected = take(stream, 6)
    resumed = data.stream(cfg, seed=0)
    resumed.set_state(state)
    assert_same(take(resumed, 6), expected)


@pytest.mark.skipif(not (SHARED / "vocabs" / "pg19train_bpe_512.model").is_file(),
                    reason="../shared/data/vocabs is missing")
def test_synthetic_with_sentencepiece_tags_the_recalled_values():
    pytest.importorskip("sentencepiece")
    cfg = DataConfig(vocabulary="sentencepiece", segment_length=64, batch_size=1,
                     options={"vocabulary_path": str(SHARED / "vocabs" / "pg19train_bpe_512.model"),
                              "num_documents": 2, "document_length": 2000})
    stream = data.stream(cfg, seed=0)
    vocab = stream.vocabulary
    batches = take(stream, 30)
    tokens = np.concatenate([b["tokens"][0] for b in batches])
    mask = np.concatenate([b["long_range"][0] for b in batches])
    assert 0 < mask.sum() < 0.2 * np.count_nonzero(tokens)
    cut = np.flatnonzero(~mask)[-1]  # (the last value may be cut off where we stopped reading)
    tagged = vocab.decode(np.where(mask, tokens, 0)[:cut])
    # the tagged pieces spell the recalled values (pieces are aligned approximately: a leading
    # space may come along with the first piece of a value)
    for value in tagged.split():
        assert re.fullmatch(r"([A-Z]{2}-\d{4}|[A-Z][a-z]+)+", value), value
    for b in batches:
        assert (b["num_chars"] == [vocab.num_chars(b["tokens"][0, 1:])]).all()


def test_synthetic_sizes_are_bounded_before_anything_is_generated():
    from meliad_data.synthetic import open_synthetic

    for key, value in (("document_length", 10**12), ("num_documents", 10**12), ("num_facts", 10**9)):
        with pytest.raises(RecipeError, match=rf"data.options.{key}: got {value}, expected at most"):
            open_synthetic(DataConfig(options={key: value}), "train", 0)
