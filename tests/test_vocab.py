"""Vocabularies: the bytes and sentencepiece plugins, num_chars, offsets, training."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from meliad_core.config import DataConfig, RecipeError
from meliad_core.plugins import PluginError
from meliad_core.vocab import Vocabulary, load_vocabulary, overlap_mask

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VOCAB_512 = SHARED / "vocabs" / "pg19train_bpe_512.model"
BOOKS = sorted((SHARED / "books").glob("*.txt")) if (SHARED / "books").is_dir() else []
HAVE_SPM = importlib.util.find_spec("sentencepiece") is not None

needs_spm = pytest.mark.skipif(not HAVE_SPM, reason="sentencepiece is not installed")
needs_vocab = pytest.mark.skipif(not (HAVE_SPM and VOCAB_512.is_file()),
                                 reason="sentencepiece or ../shared/data/vocabs is missing")


# -- bytes ------------------------------------------------------------------------------------------


def test_bytes_ids_and_round_trip():
    vocab = load_vocabulary(DataConfig(vocabulary="bytes"))
    assert isinstance(vocab, Vocabulary)
    assert vocab.vocab_size == 259 and vocab.pad_id == 0
    assert vocab.encode("A") == [ord("A") + 3]
    assert vocab.encode("\x00\xff") == [3, 0xC3 + 3, 0xBF + 3]  # ids are UTF-8 bytes + 3
    text = "Héllo, wörld! 漢字 \U0001F600\n"
    ids = vocab.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert min(ids) >= 3 and max(ids) < vocab.vocab_size
    assert vocab.decode(ids) == text
    assert vocab.decode([0] + ids + [0, 0, 1]) == text  # padding and eos are skipped
    assert vocab.encode("") == []


def test_bytes_num_chars_counts_utf8_bytes_of_non_padding():
    vocab = load_vocabulary(DataConfig(vocabulary="bytes"))
    text = "añb"
    ids = vocab.encode(text)
    assert vocab.num_chars(ids) == 4
    assert vocab.num_chars(ids + [0, 0, 0]) == 4
    assert vocab.num_chars(np.array([[0, 0], [0, 0]])) == 0


def test_bytes_offsets_and_span_mask():
    vocab = load_vocabulary(DataConfig(vocabulary="bytes"))
    text = "aé漢b code X1"
    ids, starts, ends = vocab.encode_with_offsets(text)
    assert list(starts) == [0, 1, 1, 2, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert list(ends) == [s + 1 for s in starts]
    span = (text.index("X1"), text.index("X1") + 2)
    ids, mask = vocab.span_mask(text, [span, (1, 2)])
    assert vocab.decode(ids[mask]) == "é" + "X1"


def test_overlap_mask():
    # tokens covering chars [0,2) [2,5) [5,6) [6,9); spans [3,4) and [8,20)
    mask = overlap_mask(9, [(3, 4), (8, 20)], [0, 2, 5, 6], [2, 5, 6, 9])
    assert mask.tolist() == [False, True, False, True]
    assert overlap_mask(3, [], [0], [3]).tolist() == [False]


def test_unknown_vocabulary_lists_known_names():
    with pytest.raises(PluginError, match="known: .*bytes"):
        load_vocabulary(DataConfig(vocabulary="no_such_vocab"))


# -- sentencepiece ---------------------------------------------------------------------------------


@needs_spm
def test_sentencepiece_is_available_and_needs_a_path(tmp_path):
    from meliad_vocab.sentencepiece_vocab import unavailable

    assert unavailable() is None
    with pytest.raises(RecipeError, match=r"^data\.options\.vocabulary_path: missing"):
        load_vocabulary(DataConfig(vocabulary="sentencepiece"))
    with pytest.raises(RecipeError, match="no such file"):
        load_vocabulary(DataConfig(vocabulary="sentencepiece", options={"vocabulary_path": str(tmp_path / "x")}))
    bad = tmp_path / "bad.model"
    bad.write_text("not a model")
    with pytest.raises(RecipeError, match="not a SentencePiece model"):
        load_vocabulary(DataConfig(vocabulary="sentencepiece", options={"vocabulary_path": str(bad)}))


def test_sentencepiece_reports_missing_package(monkeypatch):
    import meliad_vocab.sentencepiece_vocab as module

    real = importlib.util.find_spec
    monkeypatch.setattr(module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "sentencepiece" else real(name, *a))
    assert "pip install" in module.unavailable()


@pytest.fixture(scope="module")
def spm512():
    if not (HAVE_SPM and VOCAB_512.is_file()):
        pytest.skip("sentencepiece or ../shared/data/vocabs is missing")
    return load_vocabulary(DataConfig(vocabulary="sentencepiece", options={"vocabulary_path": str(VOCAB_512)}))


def test_sentencepiece_shifts_ids_so_zero_is_padding(spm512):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(VOCAB_512))
    assert spm512.vocab_size == sp.get_piece_size() + 1 == 513
    text = "The code of Tarin is QX-4821, said the old clerk.  Twice."
    ids = spm512.encode(text)
    assert ids == [i + 1 for i in sp.encode(text)]
    assert 0 not in ids
    assert spm512.decode(ids) == text
    assert spm512.decode([0, 0] + ids + [0]) == text
    # the model's <unk> (its id 0) becomes our id 1
    assert spm512.unk_id == 1
    assert spm512.encode("\U0001F600")[-1] == 1
    assert spm512.piece(0) == "<pad>" and spm512.piece(1) == "<unk>"


@pytest.mark.skipif(not BOOKS, reason="../shared/data/books is missing")
def test_sentencepiece_on_a_book_never_produces_padding(spm512):
    text = BOOKS[0].read_text(encoding="utf-8")[:20000]
    ids = spm512.encode_array(text)
    assert ids.dtype == np.int32 and ids.min() >= 1 and ids.max() < spm512.vocab_size
    # num_chars adds up across any cut into segments
    total = spm512.num_chars(ids)
    assert total == sum(spm512.num_chars(ids[k:k + 100]) for k in range(0, len(ids), 100))
    assert abs(total - len(text.encode("utf-8"))) < 0.01 * len(text)


def test_sentencepiece_span_mask(spm512):
    text = "First the code of Tarin is QX-4821. Later, the code of Tarin is QX-4821 again."
    start = text.rindex("QX-4821")
    ids, mask = spm512.span_mask(text, [(start, start + 7)])
    assert 0 < mask.sum() < len(ids)
    assert spm512.decode(ids[mask]).strip() == "QX-4821"


@needs_spm
def test_train_sentencepiece(tmp_path):
    from meliad_vocab import train_sentencepiece
    from meliad_data.synthetic import SyntheticLedgers

    texts = [d.text for d in SyntheticLedgers("train", 8, document_length=3000)]
    path = train_sentencepiece(texts, tmp_path / "sub" / "tiny", vocab_size=200)
    assert path == tmp_path / "sub" / "tiny.model" and path.is_file()
    vocab = load_vocabulary(DataConfig(vocabulary="sentencepiece", options={"vocabulary_path": str(path)}))
    assert vocab.vocab_size == 201
    sample = texts[0].splitlines()[1]  # nmt_nfkc turns newlines into spaces, so one line
    ids = vocab.encode(sample)
    assert 0 not in ids and vocab.decode(ids) == sample


# -- meliad vocab train ------------------------------------------------------------------------------


@needs_spm
def test_cli_vocab_train(tmp_path, capsys):
    cli = pytest.importorskip("meliad_core.cli")
    from meliad_data.synthetic import SyntheticLedgers

    for i, doc in enumerate(SyntheticLedgers("train", 4, document_length=3000)):
        (tmp_path / f"doc{i}.txt").write_text(doc.text, encoding="utf-8")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"data:\n  source: text_files\n  options:\n    paths: {tmp_path / '*.txt'}\n")
    prefix = tmp_path / "out" / "tiny"
    assert cli.run_cli(["vocab", "train", str(recipe), "--output", str(prefix), "--vocab-size", "150"]) == 0
    assert "tiny.model" in capsys.readouterr().out
    vocab = load_vocabulary(DataConfig(vocabulary="sentencepiece",
                                       options={"vocabulary_path": str(prefix) + ".model"}))
    assert vocab.vocab_size == 151

    # bad input: one line on stderr, exit status 2
    for args in (["--vocab-size", "3"], ["--vocab-size", "150", "--set", "data.options.paths=/no/such/*.txt"]):
        assert cli.run_cli(["vocab", "train", str(recipe), "--output", str(prefix), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("meliad: error: ") and err.count("\n") == 1
    assert cli.run_cli(["vocab", "train", str(tmp_path / "missing.yaml"), "-o", str(prefix),
                        "--vocab-size", "150"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
