"""The kNN memory layer of the Memorizing Transformer (spec §7).

One external memory per (batch row, head): keys and values (B, H, M, D) and a write counter (B,).
Each segment first retrieves, for every query, its k nearest keys from the memory as it was, then
writes its own keys and values FIFO, whole segments at a time. Local attention and attention over
the retrieved neighbours are mixed by a learned per-head gate g = σ(b), b initialised at 0:
y = (1 − g)·y_local + g·y_memory. The kNN search itself is a `memory_store` plugin; this layer
owns everything else (size, store, gate, strides, resets, storage dtype).

State: {"memory_keys", "memory_values", "memory_index"} for a device store. A host store (see
`meliad_core.host_store`) keeps the memory itself, outside the compiled step: the layer then carries
no state in the model's variables and, on each segment, makes one host call
(`meliad_core.host_calls.host_call`) that resets the rows starting a document, retrieves the
neighbours of the queries, and writes the segment's keys and values, in that order, in the memory
of the stream it is told (`call(..., stream=)`). Incremental decoding (`decode_step`) drives a host
store one token at a time through two host calls: reset-and-retrieve with each token's queries, and
the write of the whole segment when its last token has been decoded (keys and values wait in the
decoding state until then), in the memory of the stream `decode_stream` names.
"""

from __future__ import annotations

import copy
from typing import Protocol

import keras
import numpy as np
from keras import ops

from meliad_core import assemble
from meliad_core.plugins import PluginError
from meliad_core.host_store import is_host_store
from meliad_core.layers.attention import MASK_VALUE, safe_softmax


class MemoryStore(Protocol):
    """What a `memory_store` plugin registers.

    `retrieve(key_db, value_db, filled, queries, num_neighbors, query_chunk)`: key_db and value_db
    are (B, H, M, D); filled is bool (B, M), the slots holding written data; queries (B, H, N, D).
    Returns (keys, values), each (B, H, N, num_neighbors, D). Neighbours that do not exist are zeros
    (they still take softmax mass in the external attention, as in meliad). `query_chunk` is the
    number of queries to score at once (0: the store chooses), which bounds peak memory.
    """

    def retrieve(self, key_db, value_db, filled, queries, num_neighbors: int, query_chunk: int): ...


def query_chunk_size(batch: int, heads: int, num_queries: int, memory_size: int, requested: int = 0,
                     max_entries: int = 1 << 25) -> int:
    """Queries scored at once: `requested`, or the largest divisor of N keeping B·H·chunk·M under max_entries."""
    if requested > 0:
        chunk = min(requested, num_queries)
    else:
        chunk = max(1, min(num_queries, max_entries // max(1, batch * heads * memory_size)))
    while num_queries % chunk:
        chunk -= 1
    return chunk


def reset_rows(key_db, value_db, index, start_of_sequence):
    """Empties the memories of the batch rows that start a new document."""
    key_db, value_db, index = (ops.convert_to_tensor(t) for t in (key_db, value_db, index))
    start_of_sequence = ops.convert_to_tensor(start_of_sequence)
    sos = ops.reshape(start_of_sequence, (-1, 1, 1, 1))
    zeros = ops.zeros_like(key_db)
    return (ops.where(sos, zeros, key_db), ops.where(sos, zeros, value_db),
            ops.where(start_of_sequence, ops.zeros_like(index), index))


def filled_slots(index, memory_size: int):
    """(B, M) bool: slots that hold written data (writes start at slot 0 and wrap around)."""
    index = ops.convert_to_tensor(index)
    return ops.arange(memory_size)[None, :] < ops.minimum(index, memory_size)[:, None]


def write_segment(key_db, value_db, index, keys, values):
    """Writes one segment (B, H, n, D) at slot index % M of each row, then advances the index by n.

    M is a multiple of n and writes are whole segments, so the target is one of M/n aligned blocks;
    choosing it with a one-hot `where` keeps every row independent with plain elementwise ops.
    """
    # numpy inputs become tensors first, so every op below runs on the backend's device
    key_db, value_db, index, keys, values = (ops.convert_to_tensor(t) for t in (key_db, value_db, index, keys, values))
    heads, memory_size, dim = key_db.shape[1], key_db.shape[2], key_db.shape[3]
    n = keys.shape[2]
    num_blocks = memory_size // n
    block = (index % memory_size) // n
    onehot = ops.reshape(ops.arange(num_blocks)[None, :] == block[:, None], (-1, 1, num_blocks, 1, 1))
    shape = (-1, heads, num_blocks, n, dim)

    def put(db, new):
        new = ops.cast(new, db.dtype)[:, :, None]
        return ops.reshape(ops.where(onehot, new, ops.reshape(db, shape)), (-1, heads, memory_size, dim))

    return put(key_db, keys), put(value_db, values), index + n


def external_attention(queries, keys, values, scale=None, valid=None):
    """softmax_n(scale·q·k_n)·v_n over each query's own retrieved neighbours (spec §7.4), no bias.

    queries (B, H, N, D); keys, values (B, H, N, k, D); scale (H,) or None. Returns (B, H, N, D).
    meliad masks nothing (empty neighbours are zeros that take softmax mass); with `valid`
    (B, H, N, k) bool only valid neighbours count, and a query with none gets zeros.
    """
    logits = ops.einsum("bhnd,bhnkd->bhnk", queries, keys)
    if scale is not None:
        logits = logits * ops.cast(ops.reshape(scale, (1, -1, 1, 1)), logits.dtype)
    if valid is None:
        probs = ops.softmax(logits, axis=-1)
    else:
        probs = safe_softmax(ops.where(valid, logits, ops.cast(MASK_VALUE, logits.dtype)), axis=-1)
    return ops.einsum("bhnk,bhnkd->bhnd", probs, values)


def retrieved_valid(keys):
    """(B, H, N, k) bool: the retrieved neighbours that are not empty (all-zero) slots."""
    return ops.sum(ops.abs(keys), axis=-1) > 0


@keras.saving.register_keras_serializable(package="meliad")
class KNNMemory(keras.layers.Layer):
    def __init__(self, *, num_heads: int, head_dim: int, size: int, neighbors: int, store: str = "bucketed",
                 store_options: dict | None = None, query_chunk: int = 0, query_stride: int = 1,
                 update_stride: int = 1, reset_on_new_document: bool = True, storage_dtype: str = "float32",
                 gate_init: float = 0.0, empty: str = "zeros", **kwargs):
        super().__init__(**kwargs)
        self.num_heads, self.head_dim, self.size, self.neighbors = num_heads, head_dim, size, neighbors
        self.store_name, self.store_options = store, dict(store_options or {})
        self.query_chunk, self.query_stride, self.update_stride = query_chunk, query_stride, update_stride
        self.reset_on_new_document, self.storage_dtype = reset_on_new_document, storage_dtype
        self.gate_init, self.empty = gate_init, empty
        self.store = assemble.memory_store(store, self.store_options)
        self.host = is_host_store(self.store)
        self._host_store, self._host_batch = None, None
        self.decode_stream: str | None = None  # the host memory incremental decoding reads and writes

    # -- host stores (meliad_core.host_store) --------------------------------------------------------

    def init_host(self, streams, batch_size: int) -> None:
        """Gives this layer its own host store instance, initialised for `streams` of `batch_size` rows."""
        if not self.host:
            return
        options = assemble.options_for("memory_store", self.store_name, self.store_options, "memory.options")
        # each layer its own instance: a store that is not a HostMemoryStore (no `new`) is copied
        store = self.store.new() if hasattr(self.store, "new") else copy.copy(self.store)
        store.init(tuple(streams), int(batch_size), self.num_heads, self.head_dim, options, size=self.size)
        self._host_store, self._host_batch = store, int(batch_size)

    def host_store(self, batch_size: int | None = None):
        """This layer's host store (initialised on first use for the default streams)."""
        if self._host_store is None:
            from meliad_core.model import STREAMS

            self.init_host(STREAMS, batch_size or 1)
        return self._host_store

    def _host_segment(self, q_t, new_k, new_v, start_of_sequence, stream):
        """One host call: reset rows → retrieve (the memory before this segment) → write. (B, H, N/s, k, D) out."""
        from meliad_core.host_calls import host_call

        batch = q_t.shape[0] or self._host_batch
        store = self.host_store(batch)
        stream = stream or "predict"
        queries = ops.cast(q_t[:, :, ::self.query_stride], "float32")
        shape = (batch, self.num_heads, queries.shape[2], self.neighbors, self.head_dim)
        reset, k = self.reset_on_new_document, self.neighbors

        def segment(sos, queries, keys, values):
            rows = [int(r) for r in np.flatnonzero(sos)] if reset else []
            if rows:
                store.reset(stream, rows)
            found = store.retrieve(stream, queries, k)
            store.write(stream, keys, values)
            return found

        sos = ops.reshape(ops.cast(start_of_sequence, "bool"), (-1,))
        return host_call(segment, [sos, queries, ops.cast(new_k, "float32"), ops.cast(new_v, "float32")],
                         [(shape, "float32"), (shape, "float32")], name=f"{self.name}_host_memory")

    def build(self, input_shape=None):
        self.gate_bias = self.add_weight(shape=(self.num_heads,), name="external_memory_bias",
                                         initializer=keras.initializers.Constant(self.gate_init))

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "head_dim": self.head_dim, "size": self.size,
                "neighbors": self.neighbors, "store": self.store_name, "store_options": self.store_options,
                "query_chunk": self.query_chunk, "query_stride": self.query_stride,
                "update_stride": self.update_stride, "reset_on_new_document": self.reset_on_new_document,
                "storage_dtype": self.storage_dtype, "gate_init": self.gate_init, "empty": self.empty}

    def state_spec(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
        if self.host:  # the memory lives in the host store
            return {}
        shape = (batch_size, self.num_heads, self.size, self.head_dim)
        return {"memory_keys": (shape, self.storage_dtype), "memory_values": (shape, self.storage_dtype),
                "memory_index": ((batch_size,), "int32")}

    def call(self, q, k, v, y_local, state: dict, start_of_sequence, scale=None, attend_queries=None,
             stream: str | None = None):
        """Retrieve with the queries, then write this segment; q, k, v, y_local (B, N, H, D).

        attend_queries: the queries that score the retrieved neighbours, if not q (meliad uses the
        local attention's queries there, rotated with rotary positions, while retrieval uses q).
        stream: the model's stream ("train", "eval", "predict"), a static string; host stores keep
        one memory per stream. Returns (y (B, N, H, D), new_state).
        """
        q_t = ops.transpose(q, (0, 2, 1, 3))  # (B, H, N, D)
        # The writes carry no gradient (nor does retrieval); the gradient reaches the current
        # queries, the scale and the gate through the external attention only.
        s = self.update_stride
        new_k = ops.stop_gradient(ops.transpose(k[:, s - 1::s], (0, 2, 1, 3)))
        new_v = ops.stop_gradient(ops.transpose(v[:, s - 1::s], (0, 2, 1, 3)))
        if self.host:  # reset, retrieval and write all happen in one host call; nothing in the model's state
            r_keys, r_values = self._check_retrieved(*self._host_segment(q_t, new_k, new_v, start_of_sequence,
                                                                         stream), q_t)
            new_state = {}
        else:
            key_db, value_db, index = state["memory_keys"], state["memory_values"], state["memory_index"]
            if self.reset_on_new_document:
                key_db, value_db, index = reset_rows(key_db, value_db, index, start_of_sequence)
            r_keys, r_values = self._retrieve(key_db, value_db, index, q_t)
            key_db, value_db, index = write_segment(key_db, value_db, index, new_k, new_v)
            new_state = {"memory_keys": key_db, "memory_values": value_db, "memory_index": index}
        if attend_queries is not None:
            q_t = ops.transpose(attend_queries, (0, 2, 1, 3))
        gate = ops.reshape(ops.sigmoid(self.gate_bias), (1, 1, -1, 1))
        if self.empty == "mask":  # empty neighbours take no mass; a query with none keeps its local attention
            valid = retrieved_valid(r_keys)
            y_memory = external_attention(q_t, r_keys, r_values, scale, valid)
            found = ops.cast(ops.any(valid, axis=-1), gate.dtype)[..., None]  # (B, H, N, 1)
            gate = gate * ops.transpose(found, (0, 2, 1, 3))
        else:
            y_memory = external_attention(q_t, r_keys, r_values, scale)
        y_memory = ops.transpose(y_memory, (0, 2, 1, 3))
        return y_local * (1.0 - gate) + ops.cast(y_memory, y_local.dtype) * gate, new_state

    def _retrieve(self, key_db, value_db, index, q_t):
        """Neighbours (B, H, N, k, D) for every query; with query_stride s only queries 0, s, 2s, ...
        retrieve and the others get zeros (meliad's BatchedMemory)."""
        s = self.query_stride
        queries = ops.stop_gradient(q_t[:, :, ::s])
        filled = filled_slots(index, self.size)
        r_keys, r_values = self.store.retrieve(key_db, value_db, filled, ops.cast(queries, key_db.dtype),
                                               self.neighbors, self.query_chunk)
        return self._check_retrieved(r_keys, r_values, q_t)

    def _check_retrieved(self, r_keys, r_values, q_t):
        """Checks the store's shapes, casts to the queries' dtype, spreads strided queries' neighbours."""
        s, n = self.query_stride, q_t.shape[2]
        expected = (q_t.shape[0], self.num_heads, n // s, self.neighbors, self.head_dim)
        for name, got in (("keys", r_keys), ("values", r_values)):
            if tuple(got.shape)[1:] != expected[1:]:
                raise PluginError(f"memory store {self.store_name!r} returned {name} of shape {tuple(got.shape)}, "
                                  f"expected (batch, heads, queries, neighbors, head_dim) = {expected}")
        r_keys, r_values = ops.cast(r_keys, q_t.dtype), ops.cast(r_values, q_t.dtype)
        if s > 1:
            def spread(r):  # (B, H, N/s, k, D) -> (B, H, N, k, D), zeros between the strided queries
                zeros = ops.repeat(ops.zeros_like(r[:, :, :, None]), s - 1, axis=3)
                padded = ops.concatenate([r[:, :, :, None], zeros], axis=3)
                return ops.reshape(padded, (-1, self.num_heads, n, self.neighbors, self.head_dim))
            r_keys, r_values = spread(r_keys), spread(r_values)
        return r_keys, r_values

    # -- incremental decoding (meliad_core.decoding) -------------------------------------------------

    def decode_spec(self, batch_size: int, segment_length: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """The memory itself (a device store's; a host store keeps it), plus the keys and values of the
        segment being decoded, written when the segment is complete."""
        dtype = "float32" if self.host else self.storage_dtype  # host stores take float32
        pending = ((batch_size, self.num_heads, segment_length, self.head_dim), dtype)
        return {**self.state_spec(batch_size), "pending_keys": pending, "pending_values": pending}

    def decode_step(self, q, k, v, y_local, state: dict, position, start, scale=None, attend_queries=None):
        """One token at `position` of its segment (int scalar tensor); q, k, v, y_local (B, 1, H, D).

        The token queries the memory as it was at the segment's start; its key and value wait in the
        pending buffer until the segment's last token, when the whole segment is written as `call` does.
        A host store is driven through host calls in the same order as `call`'s: reset (a document's
        first token) → retrieve (every token) → write (the segment's last token), in the memory of
        the stream `decode_stream` (set by the Decoder; default "predict").
        """
        pending_k, pending_v = state["pending_keys"], state["pending_values"]
        n = pending_k.shape[2]
        pending_k = ops.slice_update(pending_k, (0, 0, position, 0), ops.cast(ops.transpose(k, (0, 2, 1, 3)),
                                                                              pending_k.dtype))
        pending_v = ops.slice_update(pending_v, (0, 0, position, 0), ops.cast(ops.transpose(v, (0, 2, 1, 3)),
                                                                              pending_v.dtype))
        q_t = ops.transpose(q, (0, 2, 1, 3))
        s = self.update_stride
        retrieves = position % self.query_stride == 0  # meliad's query stride
        if self.host:
            r_keys, r_values = self._host_decode_lookup(q_t, position, start, retrieves)
            self._host_decode_write(position == n - 1, pending_k[:, :, s - 1::s], pending_v[:, :, s - 1::s])
            new_state = {}
        else:
            key_db, value_db, index = state["memory_keys"], state["memory_values"], state["memory_index"]
            if self.reset_on_new_document:
                key_db, value_db, index = ops.cond(
                    ops.logical_and(position == 0, ops.any(start)),
                    lambda: reset_rows(key_db, value_db, index, start), lambda: (key_db, value_db, index))
            r_keys, r_values = self.store.retrieve(key_db, value_db, filled_slots(index, self.size),
                                                   ops.cast(ops.stop_gradient(q_t), key_db.dtype), self.neighbors,
                                                   self.query_chunk)
            key_db, value_db, index = ops.cond(
                position == n - 1,
                lambda: write_segment(key_db, value_db, index, pending_k[:, :, s - 1::s], pending_v[:, :, s - 1::s]),
                lambda: (key_db, value_db, index))
            new_state = {"memory_keys": key_db, "memory_values": value_db, "memory_index": index}
        retrieves = ops.cast(retrieves, q_t.dtype)
        r_keys, r_values = ops.cast(r_keys, q_t.dtype) * retrieves, ops.cast(r_values, q_t.dtype) * retrieves
        if attend_queries is not None:
            q_t = ops.transpose(attend_queries, (0, 2, 1, 3))
        gate = ops.reshape(ops.sigmoid(self.gate_bias), (1, 1, -1, 1))
        if self.empty == "mask":
            valid = retrieved_valid(r_keys)
            y_memory = external_attention(q_t, r_keys, r_values, scale, valid)
            gate = gate * ops.transpose(ops.cast(ops.any(valid, axis=-1), gate.dtype)[..., None], (0, 2, 1, 3))
        else:
            y_memory = external_attention(q_t, r_keys, r_values, scale)
        new_state.update({"pending_keys": pending_k, "pending_values": pending_v})
        y_memory = ops.cast(ops.transpose(y_memory, (0, 2, 1, 3)), y_local.dtype)
        return y_local * (1.0 - gate) + y_memory * gate, new_state

    def _host_decode_lookup(self, q_t, position, start, retrieves):
        """Host call: reset the rows that start a document (at a segment's first token), then retrieve
        the neighbours of this token's queries (zeros where the query stride skips it). (B, H, 1, k, D)."""
        from meliad_core.host_calls import host_call

        batch = q_t.shape[0] or self._host_batch
        store, stream = self.host_store(batch), self.decode_stream or "predict"
        shape = (batch, self.num_heads, 1, self.neighbors, self.head_dim)
        reset, k = self.reset_on_new_document, self.neighbors

        def lookup(starting, retrieve, queries):
            rows = [int(r) for r in np.flatnonzero(starting)] if reset else []
            if rows:
                store.reset(stream, rows)
            if not bool(retrieve):
                return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            return store.retrieve(stream, queries, k)

        starting = ops.logical_and(ops.reshape(ops.cast(start, "bool"), (-1,)), position == 0)
        return host_call(lookup, [starting, retrieves, ops.cast(ops.stop_gradient(q_t), "float32")],
                         [(shape, "float32"), (shape, "float32")], name=f"{self.name}_host_decode_lookup")

    def _host_decode_write(self, complete, keys, values) -> None:
        """Host call when `complete` (the segment's last token): write the segment's (B, H, n, D) keys and values."""
        from meliad_core.host_calls import host_call

        store, stream = self.host_store(keys.shape[0] or self._host_batch), self.decode_stream or "predict"

        def write(keys, values):
            store.write(stream, keys, values)
            return np.zeros((), np.int32)

        # the host call's result is unused: it runs for its effect (ordered on every backend)
        ops.cond(complete, lambda: host_call(write, [keys, values], [((), "int32")],
                                             name=f"{self.name}_host_decode_write")[0],
                 lambda: ops.zeros((), "int32"))


def host_memories(layer) -> list[KNNMemory]:
    """The kNN memory layers under `layer` whose store keeps its memory on the host, in a fixed order."""
    found = [sub for sub in layer._flatten_layers(include_self=True, recursive=True)
             if isinstance(sub, KNNMemory) and sub.host]
    return sorted(found, key=lambda sub: sub.path)
