"""`meliad vocab train`: trains a SentencePiece vocabulary on the documents of a recipe's data source."""

from __future__ import annotations

import collections.abc
import itertools
import os

import click


class _BadInput(click.ClickException):
    """One line on stderr, exit status 2 (as meliad_core.cli.BadInput)."""

    exit_code = 2


def add_vocab_commands(cli: click.Group) -> None:
    @cli.group("vocab")
    def vocab_group() -> None:
        """Vocabularies: train a SentencePiece model for `data.vocabulary: sentencepiece`."""

    @vocab_group.command("train")
    @click.argument("recipe")
    @click.option("--output", "-o", "output", required=True, metavar="PREFIX",
                  help="Writes PREFIX.model and PREFIX.vocab.")
    @click.option("--vocab-size", type=click.IntRange(min=1), required=True, metavar="N",
                  help="Number of SentencePiece pieces (the meliad vocabulary then has N + 1 ids).")
    @click.option("--model-type", type=click.Choice(["bpe", "unigram", "char", "word"]), default="bpe",
                  show_default=True)
    @click.option("--max-documents", type=click.IntRange(min=1), default=None, metavar="K",
                  help="Read at most K documents of the train split.")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a recipe key (dotted), value parsed as YAML. Repeatable.")
    def vocab_train(recipe: str, output: str, vocab_size: int, model_type: str, max_documents: int | None,
                    overrides: tuple[str, ...]) -> None:
        """Train a SentencePiece vocabulary on the train documents of RECIPE's data source."""
        from meliad_core import data, recipes

        from .sentencepiece_vocab import train_sentencepiece, unavailable

        reason = unavailable()
        if reason:
            raise _BadInput(f"meliad vocab train: {reason}")
        loaded = recipes.load_recipe(recipe, overrides, check_plugins=False)
        source = data.open_documents(loaded.data, "train", loaded.train.seed)
        if not isinstance(source, collections.abc.Sequence):
            source = source(data.epoch_seed(loaded.train.seed, 0, "train"))
        texts = (data.as_document(item).text for item in itertools.islice(iter(source), max_documents))
        try:
            path = train_sentencepiece(texts, output, vocab_size, model_type=model_type)
        except RuntimeError as exc:  # SentencePiece's own complaints, e.g. a vocabulary too large
            raise _BadInput(f"meliad vocab train: {' '.join(str(exc).split())}") from None
        click.echo(f"wrote {path} ({vocab_size} pieces); use it with data.vocabulary: sentencepiece and "
                   f"data.options.vocabulary_path: {os.fspath(path)}")
