"""Streaming batches of segments in which every document keeps its batch slot (spec §9.2-9.3).

Each document is tokenized and cut into consecutive segments of N = `data.segment_length` tokens, the
last one zero-padded. A batch has B = `data.batch_size` slots: slot i keeps its document until the
document ends, then takes the next one from the (shuffled) order of the split, and
`start_of_sequence[i]` is True exactly on a document's first segment. When the documents run out a new
epoch starts with a fresh order (drawn from the seed and the epoch number); a slot may still be
finishing a document of the previous epoch.

    stream = meliad_core.data.stream(recipe, split="train")      # a BatchStream, endless
    batch = next(stream)                                          # dict of numpy arrays, see below
    state = stream.get_state()                                    # small, JSON-able
    stream.set_state(state)                                       # resumes exactly there

    # plain Keras: the model's inputs are `tokens` and `start_of_sequence`
    model.fit(keras_batches(stream), steps_per_epoch=k, epochs=e)

A batch (B slots, N tokens):

    tokens             int32 (B, N)  token ids, 0 = padding after the end of a document
    start_of_sequence  bool  (B,)    True on the first segment of a document (reset caches/memory/state)
    num_chars          int32 (B,)    UTF-8 bytes of the tokens at positions 1..N-1 that are not padding,
                                     i.e. of the scored targets (for bits per character, spec §10.3)
    epoch              int32 (B,)    the epoch in which each slot's document was drawn
    long_range         bool  (B, N)  True on tokens inside a document's `long_range_spans` (for example
                                     the recalled facts of the synthetic source). Aligned with `tokens`:
                                     the loss for token t is the prediction made at position t-1.

Data sources (plugins registered with `meliad_register_data_sources`) are factories
`open_source(data_config, split, seed)` that return either

- a random-access `collections.abc.Sequence` of documents: the stream shuffles the indices itself, per
  epoch, and the content must not depend on `seed`; or
- any other iterable: it is opened again for every epoch with a seed derived from (seed, epoch), and must
  give the same documents in the same order for the same seed (the stream skips ahead on a resume).

A document is a `str` or a `Document` (text plus tagged character spans). Empty documents are skipped.
A factory may declare its `data.options` keys as a tuple attribute `options`; when the source and the
vocabulary both do, unknown keys are rejected with one line.

Which slot reads which document (`data.assignment`):

- `first_free` (the default): a slot whose document ends takes the next document of the order, so which
  documents a slot reads depends on the lengths of every other slot's documents;
- `round_robin`: the epochs' orders are laid end to end, and document k of that sequence goes to slot
  k mod B. A slot's documents then depend on nothing but the slot's index (an empty document is skipped
  for the slot's next one), so a process can read only its own slots (`read_rows`, used by multi-host
  runs) and their positions can be gathered from several processes. With a streamed source each slot
  reads the epoch's stream itself, skipping the other slots' documents without tokenizing them.

The stream's position is (epoch, position in that epoch's order, and per slot: the epoch and position of
its document, the next segment and the segment count). Token ids are recomputed from the document when
needed, so the state stays tiny and a resumed stream yields exactly the batches the original would have.
"""

from __future__ import annotations

import collections.abc
import difflib
import itertools
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from meliad_core.config import ASSIGNMENTS, DataConfig, RecipeError
from meliad_core.vocab import Vocabulary, load_vocabulary

SPLITS = ("train", "eval")
STATE_FORMAT = "meliad.data/1"
CORE_OPTIONS = ("shuffle",)  # data.options read by the stream itself


@dataclass(frozen=True)
class Document:
    """A document: its text and, optionally, character spans [start, end) of `text` to tag (the stream
    marks their tokens in `long_range`). `name` is informative only."""

    text: str
    long_range_spans: tuple[tuple[int, int], ...] = ()
    name: str = ""


def as_document(item: Any) -> Document:
    """A `Document` from what a source yields: a Document, a str, or UTF-8 bytes."""
    if isinstance(item, Document):
        return item
    if isinstance(item, str):
        return Document(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return Document(bytes(item).decode("utf-8", errors="replace"))
    raise TypeError(f"a data source yielded {type(item).__name__}, expected str or meliad_core.data.Document")


def _split_code(split: str) -> int:
    return {"train": 0, "eval": 1}.get(split, zlib.crc32(split.encode()) + 2)


def epoch_seed(seed: int, epoch: int, split: str = "train") -> int:
    """The seed a streamed (non-Sequence) source is opened with for `epoch`: a 31-bit int."""
    sequence = np.random.SeedSequence([int(seed) % 2**64, int(epoch), _split_code(split)])
    return int(sequence.generate_state(1, dtype=np.uint32)[0] >> 1)


def keras_inputs(batch: dict) -> dict:
    """The model's inputs from a batch: `{"tokens", "start_of_sequence"}`."""
    return {"tokens": batch["tokens"], "start_of_sequence": batch["start_of_sequence"]}


def keras_batches(batches: Iterable[dict]) -> Iterator[tuple[dict]]:
    """The stream as `model.fit`/`evaluate` take it: `(inputs,)` tuples (the model computes its own targets)."""
    for batch in batches:
        yield (keras_inputs(batch),)


class DataError(RuntimeError):
    """The data cannot be streamed (no documents, a state that does not fit); one line for the user."""


class BatchStream:
    """An endless iterator of batches (see the module docstring), with `get_state`/`set_state`.

    `source` is a Sequence of documents (random access; the stream shuffles it per epoch) or a callable
    `seed -> iterable of documents` (opened once per epoch with `epoch_seed(seed, epoch, split)`).
    """

    def __init__(
        self,
        source: collections.abc.Sequence | Callable[[int], Iterable],
        vocabulary: Vocabulary,
        *,
        batch_size: int,
        segment_length: int,
        seed: int = 42,
        split: str = "train",
        shuffle: bool = True,
        name: str = "",
        assignment: str = "first_free",
    ):
        if batch_size <= 0 or segment_length <= 0:
            raise ValueError("batch_size and segment_length must be positive")
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment: got {assignment!r}, expected one of {', '.join(ASSIGNMENTS)}")
        self.assignment = assignment
        self.rows = range(int(batch_size))  # the slots this stream reads (read_rows); the others stay padding
        self.vocabulary = vocabulary
        self.batch_size = int(batch_size)
        self.segment_length = int(segment_length)
        self.seed = int(seed)
        self.split = split
        self.shuffle = bool(shuffle)
        self.name = name
        if isinstance(source, collections.abc.Sequence) and not isinstance(source, (str, bytes)):
            self._documents: collections.abc.Sequence | None = source
            self._open: Callable[[int], Iterable] | None = None
        elif callable(source):
            self._documents, self._open = None, source
        else:
            raise TypeError("source must be a Sequence of documents or a callable seed -> iterable of documents")
        self._orders: dict[int, np.ndarray] = {}
        self._reader: tuple[int, int, Iterator] | None = None  # (epoch, position, iterator) of a streamed source
        self._slot_readers: dict[int, tuple[int, int, Iterator]] = {}  # round_robin, streamed: one per slot
        self._epoch_sizes: dict[int, int] = {}  # round_robin, streamed: the epochs read to their end
        self.set_state(None)

    # -- public ----------------------------------------------------------------------------------

    @property
    def num_documents(self) -> int | None:
        """Documents per epoch (None for a streamed source)."""
        return len(self._documents) if self._documents is not None else None

    def read_rows(self, rows: range | slice) -> None:
        """Reads only these slots from now on; the other rows of every batch are padding (id 0, no
        document start, no characters) and their positions in `get_state` stay as they were. Only with
        `round_robin` assignment, where a slot's documents do not depend on the other slots."""
        rows = range(self.batch_size)[rows] if isinstance(rows, slice) else rows
        if self.assignment != "round_robin" and rows != range(self.batch_size):
            raise DataError("reading only some batch slots needs data.assignment: round_robin (with first_free, "
                            "which document a slot takes depends on every other slot)")
        self.rows = rows

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict:
        saved = self.get_state()
        try:
            return self._next_batch()
        except Exception:
            self.set_state(saved)  # a failed step leaves the position where it was
            raise

    def _next_batch(self) -> dict:
        B, N = self.batch_size, self.segment_length
        tokens = np.zeros((B, N), dtype=np.int32)
        long_range = np.zeros((B, N), dtype=bool)
        start = np.zeros((B,), dtype=bool)
        epoch = np.zeros((B,), dtype=np.int32)
        num_chars = np.zeros((B,), dtype=np.int32)
        for i in self.rows:
            slot = self._slots[i]
            if slot is None or slot["segment"] >= slot["segments"]:
                slot = self._fill(i)
            ids, mask = self._live_document(i)
            k = slot["segment"]
            piece = ids[k * N:(k + 1) * N]
            tokens[i, :len(piece)] = piece
            long_range[i, :len(piece)] = mask[k * N:(k + 1) * N]
            start[i] = k == 0
            epoch[i] = slot["epoch"]
            num_chars[i] = self.vocabulary.num_chars(tokens[i, 1:])
            slot["segment"] = k + 1
        return {"tokens": tokens, "start_of_sequence": start, "num_chars": num_chars, "epoch": epoch,
                "long_range": long_range}

    def get_state(self) -> dict:
        """The position: a JSON-able dict of ints, strings and lists."""
        return {
            "format": STATE_FORMAT,
            "source": self.name,
            "assignment": self.assignment,
            "split": self.split,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "segment_length": self.segment_length,
            "epoch": self._epoch,
            "position": self._position,
            "slots": [None if s is None else [s["epoch"], s["position"], s["segment"], s["segments"]]
                      for s in self._slots],
        }

    def set_state(self, state: dict | None) -> None:
        """Moves to a position from `get_state` (None: the very beginning)."""
        self._live: list[tuple[np.ndarray, np.ndarray] | None] = [None] * self.batch_size
        self._reader = None
        self._slot_readers = {}
        if state is None:
            self._epoch, self._position = 0, 0
            self._slots: list[dict | None] = [None] * self.batch_size
            return
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError(f"data state: expected a dict with format {STATE_FORMAT!r}")
        for key in ("split", "seed", "batch_size", "segment_length"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"data state: saved with {key}={state.get(key)!r}, this stream has "
                                f"{key}={getattr(self, key)!r}")
        if state.get("assignment", "first_free") != self.assignment:
            raise DataError(f"data state: saved with data.assignment {state.get('assignment', 'first_free')!r}, "
                            f"this stream has {self.assignment!r}")
        if state.get("source") and self.name and state["source"] != self.name:
            raise DataError(f"data state: saved from source {state['source']!r}, this stream reads {self.name!r}")
        slots = state.get("slots")
        if not isinstance(slots, list) or len(slots) != self.batch_size:
            raise DataError(f"data state: expected {self.batch_size} slots")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._slots = [None if s is None else dict(zip(("epoch", "position", "segment", "segments"), map(int, s)))
                       for s in slots]

    # -- documents -------------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self._documents)
            if self.shuffle:
                rng = np.random.default_rng(np.random.SeedSequence(
                    [self.seed % 2**64, epoch, _split_code(self.split), 0x5EED]))
                order = rng.permutation(n)
            else:
                order = np.arange(n)
            if len(self._orders) >= 4:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = order
        return self._orders[epoch]

    def _open_epoch(self, epoch: int) -> Iterator:
        return iter(self._open(epoch_seed(self.seed, epoch, self.split)))

    def _documents_at(self, epoch: int, positions: list[int]) -> list[Any]:
        """The documents at `positions` of `epoch`'s order, for re-tokenizing restored slots."""
        if self._documents is not None:
            order = self._order(epoch)
            return [self._documents[int(order[p])] for p in positions]
        found: dict[int, Any] = {}
        wanted = set(positions)
        for position, item in enumerate(itertools.islice(self._open_epoch(epoch), max(positions) + 1)):
            if position in wanted:
                found[position] = item
        missing = wanted - set(found)
        if missing:
            raise DataError(f"data state: epoch {epoch} of the source has no document {min(missing)}; "
                            "did the data change since the state was saved?")
        return [found[p] for p in positions]

    def _next_document(self) -> tuple[int, int, Any] | None:
        """(epoch, position, document) at the cursor, advancing it; None at the end of an epoch."""
        epoch, position = self._epoch, self._position
        if self._documents is not None:
            if position >= len(self._documents):
                return None
            item = self._documents[int(self._order(epoch)[position])]
        else:
            if self._reader is None or self._reader[:2] != (epoch, position):
                iterator = self._open_epoch(epoch)
                if position:
                    iterator = itertools.islice(iterator, position, None)
                self._reader = (epoch, position, iterator)
            try:
                item = next(self._reader[2])
            except StopIteration:
                return None
            self._reader = (epoch, position + 1, self._reader[2])
        self._position = position + 1
        return epoch, position, item

    def _tokenize(self, item: Any) -> tuple[np.ndarray, np.ndarray]:
        doc = as_document(item)
        ids, mask = self.vocabulary.span_mask(doc.text, doc.long_range_spans)
        return np.asarray(ids, dtype=np.int32).reshape(-1), np.asarray(mask, dtype=bool).reshape(-1)

    def _fill(self, i: int) -> dict:
        """Gives slot i the next non-empty document."""
        if self.assignment == "round_robin":
            return self._fill_round_robin(i)
        boundaries = 0
        while True:
            found = self._next_document()
            if found is None:
                boundaries += 1
                if boundaries >= 2:
                    what = f"{self.name!r} " if self.name else ""
                    raise DataError(f"data source {what}has no non-empty documents for split {self.split!r}")
                self._epoch, self._position, self._reader = self._epoch + 1, 0, None
                continue
            epoch, position, item = found
            ids, mask = self._tokenize(item)
            if len(ids):
                break
        segments = -(-len(ids) // self.segment_length)
        self._slots[i] = {"epoch": epoch, "position": position, "segment": 0, "segments": segments}
        self._live[i] = (ids, mask)
        return self._slots[i]

    def _fill_round_robin(self, i: int) -> dict:
        """Gives slot i its next non-empty document: B places further along the epochs laid end to end."""
        slot = self._slots[i]
        epoch, position = (0, i) if slot is None else (slot["epoch"], slot["position"] + self.batch_size)
        tries = 0
        while True:
            epoch, position = self._wrap(epoch, position)
            item = self._document_for_slot(i, epoch, position)
            if item is None:  # a streamed epoch that just ended before `position`: its size is now known
                continue
            ids, mask = self._tokenize(item)
            if len(ids):
                break
            tries += 1
            size = self._epoch_size(epoch)  # a streamed epoch's size is known once it has been read through
            if size is not None and tries > 2 * size + 2:
                what = f"{self.name!r} " if self.name else ""
                raise DataError(f"data source {what}gave slot {i} no non-empty document in {tries} tries for "
                                f"split {self.split!r}")
            position += self.batch_size
        segments = -(-len(ids) // self.segment_length)
        self._slots[i] = {"epoch": epoch, "position": position, "segment": 0, "segments": segments}
        self._live[i] = (ids, mask)
        return self._slots[i]

    def _epoch_size(self, epoch: int) -> int | None:
        """Documents in `epoch` (None: a streamed epoch not yet read to its end)."""
        return len(self._documents) if self._documents is not None else self._epoch_sizes.get(epoch)

    def _wrap(self, epoch: int, position: int) -> tuple[int, int]:
        """(epoch, position) with a position past its epoch's end carried into the next epochs."""
        while True:
            size = self._epoch_size(epoch)
            if size is None or position < size:
                return epoch, position
            if size == 0:
                what = f"{self.name!r} " if self.name else ""
                raise DataError(f"data source {what}has no documents for split {self.split!r}")
            epoch, position = epoch + 1, position - size

    def _document_for_slot(self, i: int, epoch: int, position: int) -> Any:
        """The document at `position` of `epoch`; None if a streamed epoch ends before it (its size is
        then recorded). Each slot keeps its own reader of a streamed source, moving forward only."""
        if self._documents is not None:
            return self._documents[int(self._order(epoch)[position])]
        reader = self._slot_readers.get(i)
        if reader is None or reader[0] != epoch or reader[1] > position:
            reader = (epoch, 0, self._open_epoch(epoch))
        epoch, at, iterator = reader
        for item in iterator:
            if at == position:
                self._slot_readers[i] = (epoch, at + 1, iterator)
                return item
            at += 1
        self._slot_readers.pop(i, None)
        self._epoch_sizes[epoch] = at
        if len(self._epoch_sizes) > 8:
            self._epoch_sizes.pop(min(self._epoch_sizes))
        return None

    def _live_document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self._live[i] is None:  # after set_state: recompute the tokens of every slot that needs them
            self._restore_live()
        return self._live[i]

    def _restore_live(self) -> None:
        wanted = [i for i in self.rows if self._live[i] is None and self._slots[i] is not None
                  and self._slots[i]["segment"] < self._slots[i]["segments"]]
        if self._documents is not None:
            items = {i: self._documents_at(self._slots[i]["epoch"], [self._slots[i]["position"]])[0] for i in wanted}
        else:  # a streamed source: one pass per epoch, up to the furthest position needed
            items = {}
            for epoch in sorted({self._slots[i]["epoch"] for i in wanted}):
                mine = [i for i in wanted if self._slots[i]["epoch"] == epoch]
                found = self._documents_at(epoch, [self._slots[i]["position"] for i in mine])
                items.update(zip(mine, found))
        for i in wanted:
            slot = self._slots[i]
            ids, mask = self._tokenize(items[i])
            if -(-len(ids) // self.segment_length) != slot["segments"]:
                raise DataError(f"data state: slot {i}'s document no longer has {slot['segments']} segments; "
                                "did the data or the vocabulary change since the state was saved?")
            self._live[i] = (ids, mask)


# ------------------------------------------------------------------------------------------------
# From a recipe


def _data_config(recipe_or_data: Any) -> tuple[DataConfig, int | None]:
    if isinstance(recipe_or_data, DataConfig):
        return recipe_or_data, None
    data = getattr(recipe_or_data, "data", None)
    if isinstance(data, DataConfig):
        train = getattr(recipe_or_data, "train", None)
        return data, getattr(train, "seed", None)
    raise TypeError(f"expected a Recipe or a DataConfig, got {type(recipe_or_data).__name__}")


def check_options(data_config: DataConfig, source_factory: Any, vocabulary_factory: Any) -> None:
    """Rejects `data.options` keys that neither the stream, the source nor the vocabulary reads (only
    when the source and the vocabulary both declare their options)."""
    options = data_config.options or {}
    if "shuffle" in options and not isinstance(options["shuffle"], bool):
        raise RecipeError(f"data.options.shuffle: got {options['shuffle']!r}, expected true or false")
    declared = [getattr(source_factory, "options", None), getattr(vocabulary_factory, "options", None)]
    if any(d is None for d in declared):
        return
    known = sorted(set(CORE_OPTIONS).union(*declared))
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"; did you mean 'data.options.{close[0]}'?" if close else ""
            raise RecipeError(
                f"data.options.{key}: unknown option for source {data_config.source!r} and vocabulary "
                f"{data_config.vocabulary!r}{hint} (known: {', '.join(known)})"
            )


def open_documents(data_config: DataConfig, split: str = "train", seed: int = 42):
    """The source's documents for `split`: a Sequence, or a callable seed -> iterable (see module doc)."""
    from meliad_core import assemble

    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}, expected one of {', '.join(SPLITS)}")
    factory = assemble.resolve("data_source", data_config.source)
    opened = factory(data_config, split, epoch_seed(seed, 0, split))
    if isinstance(opened, collections.abc.Sequence) and not isinstance(opened, (str, bytes)):
        return opened
    return lambda s: factory(data_config, split, s)


def stream(recipe: Any, split: str = "train", seed: int | None = None) -> BatchStream:
    """A `BatchStream` over `split` ("train" or "eval") of a recipe's data (or of a `DataConfig`).

    The source and the vocabulary are resolved through the plugin manager. `seed` defaults to
    `recipe.train.seed` (42 for a bare DataConfig); it drives the shuffling, not the documents.
    """
    from meliad_core import assemble

    data_config, recipe_seed = _data_config(recipe)
    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}, expected one of {', '.join(SPLITS)}")
    seed = int(seed if seed is not None else recipe_seed if recipe_seed is not None else 42)
    check_options(data_config, assemble.resolve("data_source", data_config.source),
                  assemble.resolve("vocabulary", data_config.vocabulary))
    vocabulary = load_vocabulary(data_config)
    source = open_documents(data_config, split, seed)
    return BatchStream(
        source,
        vocabulary,
        batch_size=data_config.batch_size,
        segment_length=data_config.segment_length,
        seed=seed,
        split=split,
        shuffle=(data_config.options or {}).get("shuffle", True),
        name=data_config.source,
        assignment=data_config.assignment,
    )
