"""Vocabularies: text <-> token ids, with id 0 reserved for padding.

A vocabulary is resolved by name through the plugin manager (`data.vocabulary` in a recipe); the
built-in ones live in `plugins/meliad_vocab` (`bytes`, `sentencepiece`). Every vocabulary keeps the
convention of meliad's loss (spec §10.3): **id 0 is padding** and is never produced for real text, so
the loss can mask `tokens > 0`.

`num_chars(ids)` counts the UTF-8 *bytes* the non-padding ids stand for, as meliad's pipeline did; the
metric called bits per character is therefore bits per byte (the same thing for ASCII text).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

PAD_ID = 0


class Vocabulary:
    """Base class. Subclasses set `name` and `vocab_size` and implement `encode` and `decode`.

    `vocab_size` is the number of distinct ids (0 .. vocab_size-1, padding included); the model's
    embedding table must have at least that many rows.
    """

    name: str = "vocabulary"
    vocab_size: int = 0
    pad_id: int = PAD_ID

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; never contains `pad_id`."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; padding ids are skipped."""
        raise NotImplementedError

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, starts, ends): token ids and, per token, the [start, end) *character* range of `text`
        it covers (several tokens may share a character, e.g. the bytes of one non-ASCII character).

        Used to mark the tokens of tagged character spans (`Document.long_range_spans`). A vocabulary
        that cannot align tokens to characters raises NotImplementedError; the spans are then ignored.
        """
        raise NotImplementedError

    def token_byte_lengths(self) -> np.ndarray | None:
        """Optional (vocab_size,) table: the UTF-8 bytes each id stands for (0 for padding and control
        ids). When given, `num_chars` is a table lookup and adds up exactly across segments."""
        return None

    def num_chars(self, ids: Sequence[int] | np.ndarray) -> int:
        """The UTF-8 byte length of the text of the non-padding `ids` (for bits per character)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[ids != self.pad_id]
        table = self.token_byte_lengths()
        if table is not None:
            return int(table[ids].sum())
        return len(self.decode(ids.tolist()).encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an int32 array."""
        return np.asarray(self.encode(text), dtype=np.int32)

    def span_mask(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask): int32 token ids of `text` and a bool mask, True for tokens that overlap any of the
        character `spans` ([start, end) pairs). All False if the vocabulary cannot give offsets."""
        if not spans:
            ids = self.encode_array(text)
            return ids, np.zeros(ids.shape, dtype=bool)
        try:
            ids, starts, ends = self.encode_with_offsets(text)
        except NotImplementedError:
            ids = self.encode_array(text)
            return ids, np.zeros(ids.shape, dtype=bool)
        return np.asarray(ids, dtype=np.int32), overlap_mask(len(text), spans, starts, ends)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def overlap_mask(text_length: int, spans: Sequence[tuple[int, int]], starts, ends) -> np.ndarray:
    """True for each token [starts[t], ends[t]) that shares at least one character with a span."""
    inside = np.zeros(text_length + 1, dtype=np.int64)
    for start, end in spans:
        start, end = max(0, int(start)), min(text_length, int(end))
        if end > start:
            inside[start] += 1
            inside[end] -= 1
    covered = np.cumsum(inside)[:text_length] > 0  # covered[c]: character c lies in a span
    prefix = np.concatenate([[0], np.cumsum(covered)])
    starts = np.clip(np.asarray(starts, dtype=np.int64), 0, text_length)
    ends = np.clip(np.asarray(ends, dtype=np.int64), 0, text_length)
    return (prefix[ends] - prefix[starts]) > 0


def load_vocabulary(data_config) -> Vocabulary:
    """The vocabulary named by `data_config.vocabulary`, built through the plugin manager.

    Raises `meliad_core.plugins.PluginError` (unknown or unavailable name) or
    `meliad_core.config.RecipeError` (bad `data.options`), each with a one-line message.
    """
    from meliad_core import assemble, plugins

    factory = assemble.resolve("vocabulary", data_config.vocabulary)
    vocab = factory(data_config)
    if not isinstance(vocab, Vocabulary):
        raise plugins.PluginError(
            f"vocabulary {data_config.vocabulary!r}: the plugin returned {type(vocab).__name__}, "
            "expected a meliad_core.vocab.Vocabulary"
        )
    return vocab
