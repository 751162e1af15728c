"""The `sentencepiece` vocabulary, and `train_sentencepiece` to make one.

Recipe: `data.vocabulary: sentencepiece` with `data.options.vocabulary_path: path/to/model.model`.

Ids are the SentencePiece ids **shifted up by one**: meliad's loss treats id 0 as padding (spec §10.3),
and in the PG19 BPE vocabularies shipped with meliad id 0 is `<unk>` (spec §9.5), which the loss would
silently drop. After the shift, 0 is our padding, the model's `<unk>` is 1, and no real token is ever 0.
`vocab_size` = number of pieces + 1.

`num_chars` adds up per-piece UTF-8 lengths ("▁" counts as one space byte; `<unk>` and byte pieces as one
byte; control pieces as none), so it is additive across segments. It counts the normalised text
(nmt_nfkc), including the dummy-prefix space at the start of each document.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from meliad_core.config import RecipeError
from meliad_core.vocab import Vocabulary

OPTION = "vocabulary_path"
SHIFT = 1


def unavailable() -> str | None:
    if importlib.util.find_spec("sentencepiece") is None:
        return "the sentencepiece package is not installed (pip install 'meliad[sentencepiece]')"
    return None


class SentencePieceVocabulary(Vocabulary):
    name = "sentencepiece"

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece

        self.path = Path(model_file)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        pieces = self._sp.get_piece_size()
        self.vocab_size = pieces + SHIFT
        self.unk_id = self._sp.unk_id() + SHIFT if self._sp.unk_id() >= 0 else None
        table = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(pieces):
            if self._sp.is_control(i):
                continue
            if self._sp.is_unknown(i) or self._sp.is_byte(i):
                table[i + SHIFT] = 1
            else:
                table[i + SHIFT] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        self._table = table

    def encode(self, text: str) -> list[int]:
        return [i + SHIFT for i in self._sp.encode(text)]

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32) + SHIFT

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).reshape(-1)
        return self._sp.decode([int(i) - SHIFT for i in ids if i >= SHIFT])

    def encode_with_offsets(self, text: str):
        try:  # sentencepiece >= 0.2.1 gives character offsets into the original text
            result = self._sp.encode(text, return_type="offset_mapping")
        except (TypeError, ValueError) as exc:
            raise NotImplementedError("this sentencepiece version gives no offsets") from exc
        ids = np.asarray(result["ids"], dtype=np.int32) + SHIFT
        offsets = np.asarray(result["offsets"], dtype=np.int64).reshape(-1, 2)
        return ids, offsets[:, 0], offsets[:, 1]

    def token_byte_lengths(self) -> np.ndarray:
        return self._table

    def piece(self, token_id: int) -> str:
        """The SentencePiece piece of one of our ids ("<pad>" for 0)."""
        return "<pad>" if token_id < SHIFT else self._sp.id_to_piece(int(token_id) - SHIFT)


def load_sentencepiece_vocabulary(data_config) -> SentencePieceVocabulary:
    value = (data_config.options or {}).get(OPTION)
    key = f"data.options.{OPTION}"
    if value is None:
        raise RecipeError(f"{key}: missing; the sentencepiece vocabulary needs the path of a .model file")
    if not isinstance(value, (str, os.PathLike)):
        raise RecipeError(f"{key}: got {value!r}, expected the path of a SentencePiece .model file")
    path = Path(os.path.expanduser(str(value)))
    if not path.is_file():
        raise RecipeError(f"{key}: got {str(value)!r}, but there is no such file")
    try:
        return SentencePieceVocabulary(path)
    except (RuntimeError, OSError) as exc:
        raise RecipeError(f"{key}: {str(value)!r} is not a SentencePiece model ({str(exc).splitlines()[0]})")


load_sentencepiece_vocabulary.options = (OPTION,)


# ------------------------------------------------------------------------------------------------
# Training


def _sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Non-empty lines of each text; lines longer than `max_bytes` are cut at spaces (SentencePiece
    skips over-long sentences)."""
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            while len(line.encode("utf-8")) > max_bytes:
                limit = max_bytes // 4  # characters that surely fit (at most 4 bytes each)
                cut = line.rfind(" ", 1, limit)
                cut = cut if cut > 0 else limit
                yield line[:cut]
                line = line[cut:]
            if line.strip():
                yield line


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2_000_000,
    max_sentence_length: int = 4192,
    seed: int = 0,
    num_threads: int | None = None,
    **trainer_options,
) -> Path:
    """Trains a SentencePiece model on documents and returns the path of `<model_prefix>.model`.

    `vocab_size` is the number of SentencePiece pieces (as in meliad's `pg19train_bpe_<N>` files); the
    meliad vocabulary built from the result has vocab_size + 1 ids. The defaults follow those PG19
    vocabularies (spec §9.5): BPE, unk id 0 and no bos/eos/pad, digits split, `nmt_nfkc`, dummy prefix,
    extra whitespace kept. Documents are fed line by line. `trainer_options` go to SentencePieceTrainer.
    """
    import sentencepiece

    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(sentencepiece, "set_random_generator_seed"):
        sentencepiece.set_random_generator_seed(int(seed))
    options = dict(
        model_type=model_type,
        vocab_size=int(vocab_size),
        character_coverage=character_coverage,
        input_sentence_size=int(input_sentence_size),
        shuffle_input_sentence=True,
        max_sentence_length=int(max_sentence_length),
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        split_digits=True,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        num_threads=int(num_threads or max(1, min(16, os.cpu_count() or 1))),
        minloglevel=2,
    )
    options.update(trainer_options)
    sentences = _sentences(texts, int(max_sentence_length))
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=sentences, model_prefix=str(prefix), **options)
    return prefix.with_name(prefix.name + ".model")
