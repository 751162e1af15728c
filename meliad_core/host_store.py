"""The memory-store lifecycle for host stores: memories kept in host RAM, outside the compiled step.

A memory store is one of two kinds (see `meliad_core.hookspecs.meliad_register_memory_stores`):

- a **device store** (`bucketed`, `exact`, and any store with only a tensor `retrieve(key_db,
  value_db, filled, queries, num_neighbors, query_chunk)`): the memory is a tensor in the model's
  non-trainable variables, and core's kNN memory layer does the resets and FIFO writes itself;
- a **host store** (`host = True`, e.g. a subclass of `HostMemoryStore`): the store owns the
  memory, in host RAM, and core drives it through the lifecycle below from inside the compiled
  train/eval step (`meliad_core.host_calls`). Everything it sees and returns is numpy.

Lifecycle of a host store, one instance per memory layer (core calls `new()` on the registered,
configured object to get it):

    init(streams, batch, heads, dim, options, *, size)   once, before any other call
    reset(stream, rows)           rows (ints) of `stream` start new documents: empty just those
    retrieve(stream, queries, k)  queries (B, H, N, D) float32 -> (keys, values), each
                                  (B, H, N, k, D) float32; missing neighbours are zeros
    write(stream, keys, values)   keys, values (B, H, n, D) float32: one whole segment per row, FIFO:
                                  the memory of a row holds its last `size` written entries
    state() -> {name: ndarray}    everything needed to continue exactly (saved in checkpoints)
    load_state(state)             the inverse, on a store that had `init`

On each segment core calls, in this order and in the order of the steps: `reset` (if any row starts
a document), `retrieve` (the memory as it was before this segment), `write`. Incremental decoding
(`meliad_core.decoding`) makes the same calls one token at a time: `reset` at a segment's first token,
`retrieve` with each token's queries (B, H, 1, D), and `write` with the whole segment's keys and
values after its last token, so the store sees the writes of the segment path. Streams ("train",
"eval", "predict", ...) are independent memories. `FifoRing` below keeps the raw keys and values
of such a memory, for stores that want it.

This module imports neither Keras nor a framework.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import numpy as np


class HostMemoryStore:
    """Base class of host stores; override `init`, `reset`, `write`, `retrieve`, `state`, `load_state`."""

    host = True

    def new(self) -> "HostMemoryStore":
        """A fresh, uninitialised store of the same configuration (one per memory layer)."""
        return copy.copy(self)

    def init(self, streams: Sequence[str], batch: int, heads: int, dim: int, options: dict, *, size: int) -> None:
        raise NotImplementedError

    def reset(self, stream: str, rows: Iterable[int]) -> None:
        raise NotImplementedError

    def write(self, stream: str, keys: np.ndarray, values: np.ndarray) -> None:
        raise NotImplementedError

    def retrieve(self, stream: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        pass


def is_host_store(store) -> bool:
    """True for stores that keep their memory on the host (`host = True`); others are device stores."""
    return bool(getattr(store, "host", False))


class FifoRing:
    """The raw keys and values of one stream's memories: (B, H, capacity, D) rings in host RAM.

    `count[b]` is the number of entries written to row b since its last reset; entry number c of a
    row lives at slot c % capacity. Arrays are allocated on the first write (an unused stream costs
    nothing).
    """

    def __init__(self, batch: int, heads: int, dim: int, capacity: int, dtype=np.float32):
        self.batch, self.heads, self.dim, self.capacity = batch, heads, dim, capacity
        self.dtype = np.dtype(dtype)
        self.keys: np.ndarray | None = None
        self.values: np.ndarray | None = None
        self.count = np.zeros((batch,), np.int64)

    def _allocate(self) -> None:
        if self.keys is None:
            shape = (self.batch, self.heads, self.capacity, self.dim)
            self.keys, self.values = np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)

    def reset(self, rows: Iterable[int]) -> None:
        for row in rows:
            self.count[row] = 0
            if self.keys is not None:
                self.keys[row] = 0
                self.values[row] = 0

    def write(self, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Appends (B, H, n, D) to every row; returns the (B,) entry numbers where each row's segment starts."""
        self._allocate()
        n = keys.shape[2]
        if n > self.capacity:
            raise ValueError(f"a segment of {n} entries does not fit a memory of {self.capacity}")
        start = self.count.copy()
        for b in range(self.batch):
            slots = (start[b] + np.arange(n)) % self.capacity
            self.keys[b][:, slots] = keys[b]
            self.values[b][:, slots] = values[b]
        self.count += n
        return start

    def filled(self, row: int) -> int:
        return int(min(self.count[row], self.capacity))

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}count": self.count.copy()}
        if self.keys is not None:
            out[f"{prefix}keys"], out[f"{prefix}values"] = self.keys.copy(), self.values.copy()
        return out

    def load_state(self, state: dict[str, np.ndarray], prefix: str) -> None:
        self.count = np.asarray(state[f"{prefix}count"], np.int64).copy()
        if f"{prefix}keys" in state:
            self.keys = np.asarray(state[f"{prefix}keys"], self.dtype).copy()
            self.values = np.asarray(state[f"{prefix}values"], self.dtype).copy()
        else:
            self.keys = self.values = None


def top_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores along the last axis, best first; ties among the chosen k go to the
    lowest index (a tie at the k-th score may keep either index: argpartition)."""
    m = scores.shape[-1]
    k = min(k, m)
    if k < m:
        part = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    else:
        part = np.broadcast_to(np.arange(m), scores.shape).copy()
    picked = np.take_along_axis(scores, part, axis=-1)
    order = np.lexsort((part, -picked), axis=-1)
    return np.take_along_axis(part, order, axis=-1)
