"""External (key, value) memory of the Memorizing Transformer (spec §7), apart from the kNN search.

One memory per (batch slot, head): key_db and value_db are (B, H, M, D), `index` (B,) counts the
tokens written. Each segment first retrieves with its queries from the memory as it was, then
writes its own keys and values FIFO, whole segments at a time. The kNN search itself is a
`memory_store` plugin.
"""

from __future__ import annotations

from typing import Protocol

from keras import ops


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
    """Empties the memories of the batch slots that start a new document."""
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
    """Writes one segment (B, H, N, D) at slot index % M of each row, then advances the index by N.

    M is a multiple of N and writes are whole segments, so the target is one of M/N aligned blocks;
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


def external_attention(queries, keys, values, scale=None):
    """softmax_n(scale·q·k_n)·v_n over each query's own retrieved neighbours (spec §7.4); no mask, no bias.

    queries (B, H, N, D); keys, values (B, H, N, k, D); scale (H,) or None. Returns (B, H, N, D).
    """
    logits = ops.einsum("bhnd,bhnkd->bhnk", queries, keys)
    if scale is not None:
        logits = logits * ops.cast(ops.reshape(scale, (1, -1, 1, 1)), logits.dtype)
    return ops.einsum("bhnk,bhnkd->bhnd", ops.softmax(logits, axis=-1), values)
