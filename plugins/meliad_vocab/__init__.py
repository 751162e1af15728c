"""meliad_vocab: the built-in vocabularies (`bytes`, `sentencepiece`) and the `meliad vocab` commands.

A vocabulary plugin is a factory `load_vocabulary(data_config) -> meliad_core.vocab.Vocabulary`; its
`options` attribute lists the `data.options` keys it reads.
"""

from __future__ import annotations

from meliad_core.hookspecs import hookimpl

from .byte_vocab import ByteVocabulary, load_byte_vocabulary
from .sentencepiece_vocab import SentencePieceVocabulary, load_sentencepiece_vocabulary, train_sentencepiece
from .sentencepiece_vocab import unavailable as _sentencepiece_unavailable

__all__ = ["ByteVocabulary", "SentencePieceVocabulary", "load_byte_vocabulary", "load_sentencepiece_vocabulary",
           "train_sentencepiece"]


@hookimpl
def meliad_register_vocabularies(register):
    register("bytes", load_byte_vocabulary, description="UTF-8 bytes: id = byte + 3; 0 pad, 1 eos, 2 unk")
    register("sentencepiece", load_sentencepiece_vocabulary, available=_sentencepiece_unavailable,
             description="a SentencePiece model (data.options.vocabulary_path), ids shifted by one")


@hookimpl
def meliad_register_commands(cli):
    from .commands import add_vocab_commands

    add_vocab_commands(cli)
