"""The `tfds` source: documents from a prepared TensorFlow Datasets dataset (for example PG19).

Options (`data.options`):
    name           the TFDS name, e.g. `pg19` or `pg19:0.1.1` (required)
    feature        the text feature (default `book_text`)
    data_dir       where the prepared dataset lives (default: TFDS's own default, ~/tensorflow_datasets)
    train_split    TFDS split read for train (default `train`)
    eval_split     TFDS split read for eval (default `test`, as meliad; PG19's `validation` is unused)
    shuffle_files  shuffle the order of the dataset's files per epoch (default true for train, false for eval)
    download       let TFDS download and prepare the dataset if it is missing (default false)

The dataset is streamed (one pass per epoch, opened with that epoch's seed); after a resume the stream
skips ahead by reading, so resuming deep into a PG19 epoch takes a while. Needs the
`tensorflow-datasets` package (`pip install 'meliad[tfds]'`), imported only when the source is opened.
"""

from __future__ import annotations

import importlib.util
from typing import Iterator

from meliad_core.config import RecipeError

from ._options import get_bool, get_str

OPTIONS = ("name", "feature", "data_dir", "train_split", "eval_split", "shuffle_files", "download")


def unavailable() -> str | None:
    if importlib.util.find_spec("tensorflow_datasets") is None:
        return "tensorflow_datasets is not installed (pip install 'meliad[tfds]')"
    return None


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "item"):  # a numpy scalar
        return _text(value.item())
    return str(value)


def open_tfds(data_config, split: str, seed: int) -> Iterator[str]:
    """Factory for the `tfds` source: a generator of texts (checks the options before reading)."""
    options = data_config.options or {}
    name = get_str(options, "name", None, required=True, what="a TFDS dataset name such as 'pg19'")
    feature = get_str(options, "feature", "book_text", what="a feature name")
    data_dir = get_str(options, "data_dir", None, what="a folder")
    tfds_split = (get_str(options, "train_split", "train", what="a TFDS split name") if split == "train"
                  else get_str(options, "eval_split", "test", what="a TFDS split name"))
    shuffle = get_bool(options, "shuffle_files", split == "train")
    download = get_bool(options, "download", False)
    return _read(name, feature, data_dir, tfds_split, shuffle, download, seed)


def _read(name, feature, data_dir, tfds_split, shuffle, download, seed) -> Iterator[str]:
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if download:
        builder.download_and_prepare()
    elif not builder.is_prepared():
        raise RecipeError(f"data.options.name: the TFDS dataset {name!r} is not prepared in "
                          f"{builder.data_dir!r}; run `tfds build {name}` or set data.options.download: true")
    read_config = tfds.ReadConfig(shuffle_seed=int(seed))
    dataset = builder.as_dataset(split=tfds_split, shuffle_files=shuffle, read_config=read_config)
    for example in tfds.as_numpy(dataset):
        if feature not in example:
            raise RecipeError(f"data.options.feature: got {feature!r}, expected one of {', '.join(example)}")
        yield _text(example[feature])


open_tfds.options = OPTIONS
