"""The `bytes` vocabulary: one token per UTF-8 byte, as seqio's ByteVocabulary (spec §9.4).

Ids: 0 = padding, 1 = end of sequence, 2 = unknown (never produced), byte b -> b + 3. So
`vocab_size` is 259. meliad's pg19_bytes gin used NUM_EMBEDDINGS = 260 (one spare row); a recipe that
must match that (for example the 1/sqrt(V) logit scale) sets `model.vocab_size: 260`.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from meliad_core.vocab import Vocabulary

OFFSET = 3
EOS_ID = 1
UNK_ID = 2


class ByteVocabulary(Vocabulary):
    name = "bytes"
    vocab_size = 256 + OFFSET
    eos_id = EOS_ID
    unk_id = UNK_ID

    def __init__(self):
        self._table = np.ones(self.vocab_size, dtype=np.int64)
        self._table[:OFFSET] = 0

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return data.astype(np.int32) + OFFSET

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).reshape(-1)
        data = ids[ids >= OFFSET] - OFFSET
        return data.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def encode_with_offsets(self, text: str):
        ids = self.encode_array(text)
        if text.isascii():
            starts = np.arange(len(text), dtype=np.int64)
        else:
            # UTF-8 length of each character, from its code point.
            points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
            lengths = 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)
            starts = np.repeat(np.arange(len(text), dtype=np.int64), lengths)
        return ids, starts, starts + 1

    def token_byte_lengths(self) -> np.ndarray:
        return self._table


def load_byte_vocabulary(data_config) -> ByteVocabulary:
    return ByteVocabulary()


load_byte_vocabulary.options = ()
