"""meliad_data: the built-in data sources (`synthetic`, `text_files`, `tfds`).

A data source is a factory `open_source(data_config, split, seed)` returning a Sequence or an iterable
of documents (`str` or `meliad_core.data.Document`); see `meliad_core.data`. Its `options` attribute
lists the `data.options` keys it reads.
"""

from __future__ import annotations

from meliad_core.hookspecs import hookimpl

from .synthetic import SyntheticLedgers, open_synthetic
from .text_files import TextFiles, open_text_files
from .tfds_source import open_tfds
from .tfds_source import unavailable as _tfds_unavailable

__all__ = ["SyntheticLedgers", "TextFiles", "open_synthetic", "open_text_files", "open_tfds"]


@hookimpl
def meliad_register_data_sources(register):
    register("synthetic", open_synthetic,
             description="generated ledgers with facts recalled thousands of characters later (default)")
    register("text_files", open_text_files, description="UTF-8 text files: one document per file or per separator")
    register("tfds", open_tfds, available=_tfds_unavailable,
             description="a prepared TensorFlow Datasets dataset such as pg19")
