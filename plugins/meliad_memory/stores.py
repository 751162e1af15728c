"""kNN lookups over the external memory (spec §7.3), written with keras.ops.

Both stores make one pass over the memory per query: score the queries of a chunk against every
slot (B·H·chunk·M scores, the only large intermediate, bounded by `query_chunk_size`), pick slot
indices (an argmax per bucket, or a top-k), and finally gather the chosen rows of the key and value
memories once, (B·H·N·k·D) — no second weighted sum over the whole memory.
"""

from __future__ import annotations

from keras import ops

from meliad_core.extend import query_chunk_size

EMPTY_PENALTY = -1e6


def _score_chunks(queries, key_db, chunk: int):
    """(start, scores (B, H, n, M)) for each chunk of `chunk` queries."""
    n = queries.shape[2]
    for i in range(0, n, chunk):
        yield ops.einsum("bhnd,bhmd->bhnm", queries[:, :, i:i + chunk], key_db)


def _gather_rows(db, idx):
    """db (B, H, M, D), idx (B, H, N, k) int slot numbers -> (B, H, N, k, D) = db[b, h, idx[b, h, n, j]].

    One row gather over the flattened memory (index_select / gather / take on every backend); the
    index array is (B·H·N·k,), not broadcast over D.
    """
    batch, heads, size, dim = ops.shape(db)[0], db.shape[1], db.shape[2], db.shape[3]
    n, k = idx.shape[2], idx.shape[3]
    base = ops.reshape(ops.arange(heads, dtype="int32"), (1, heads, 1, 1)) * size
    base = base + ops.reshape(ops.arange(batch, dtype="int32"), (-1, 1, 1, 1)) * (heads * size)
    flat_idx = ops.reshape(ops.cast(idx, "int32") + base, (-1,))
    rows = ops.take(ops.reshape(db, (-1, dim)), flat_idx, axis=0)
    return ops.reshape(rows, (-1, heads, n, k, dim))


class BucketedStore:
    """meliad's retrieval: slot i is in bucket i mod k; each bucket gives the slot with the best score.

    Slots whose key sums to zero count as empty (score −1e6 added, as in meliad). meliad picks the
    winner with softmax(scores·1e6) over the bucket and takes a weighted sum of the bucket's keys and
    values; this store takes the argmax of the same scores and gathers that one slot, which is the
    same except for (near-)ties:
      - a bucket with no written slot: every score is exactly −1e6, meliad averages zero vectors and
        the argmax picks a zero vector: both give zeros (tested);
      - two written slots whose scores are equal (or within ~1e-6, where softmax·1e6 still blends
        them): meliad returns their (weighted) average, the argmax the first slot (lowest index).
        This needs equal float32 dot products, e.g. the same key written twice into one bucket.
    """

    def retrieve(self, key_db, value_db, filled, queries, num_neighbors: int, query_chunk: int = 0):
        key_db, value_db, queries = (ops.convert_to_tensor(t) for t in (key_db, value_db, queries))
        batch, heads, size = key_db.shape[0], key_db.shape[1], key_db.shape[2]
        k = num_neighbors
        per_bucket = size // k
        empty = ops.sum(key_db, axis=-1) == 0  # (B, H, M)
        penalty = ops.where(empty, ops.cast(EMPTY_PENALTY, key_db.dtype), ops.cast(0.0, key_db.dtype))
        penalty = ops.reshape(penalty, (-1, heads, 1, per_bucket, k))
        chunk = query_chunk_size(batch or 1, heads, queries.shape[2], size, query_chunk)
        winners = []
        for scores in _score_chunks(queries, key_db, chunk):
            scores = ops.reshape(scores, (-1, heads, scores.shape[2], per_bucket, k)) + penalty
            winners.append(ops.argmax(scores, axis=3))  # (B, H, n, k): the winning j of slot j·k + bucket
        j = winners[0] if len(winners) == 1 else ops.concatenate(winners, axis=2)
        idx = ops.cast(j, "int32") * k + ops.arange(k, dtype="int32")
        return _gather_rows(key_db, idx), _gather_rows(value_db, idx)


class ExactStore:
    """The k best-scoring filled slots for each query; missing neighbours (fewer than k filled) are zeros.

    Subclasses may replace `pick` (the k best slots of each query's scores) and keep the rest."""

    def pick(self, scores, k: int):
        """(B, H, n, M) scores, unfilled slots at the bottom -> (B, H, n, k) slot indices."""
        return ops.top_k(scores, k=k, sorted=True)[1]

    def retrieve(self, key_db, value_db, filled, queries, num_neighbors: int, query_chunk: int = 0):
        key_db, value_db, filled, queries = (ops.convert_to_tensor(t) for t in (key_db, value_db, filled, queries))
        batch, heads, size = key_db.shape[0], key_db.shape[1], key_db.shape[2]
        k = min(num_neighbors, size)
        chunk = query_chunk_size(batch or 1, heads, queries.shape[2], size, query_chunk)
        fill = ops.reshape(filled, (-1, 1, 1, size))
        picks = []
        for scores in _score_chunks(queries, key_db, chunk):
            scores = ops.where(fill, scores, ops.cast(-1e30, scores.dtype))
            picks.append(self.pick(scores, k))  # (B, H, n, k)
        idx = picks[0] if len(picks) == 1 else ops.concatenate(picks, axis=2)
        # a pick is a neighbour only if its slot is filled (fewer filled slots than k: the rest are zeros)
        rows = ops.reshape(ops.arange(ops.shape(filled)[0], dtype="int32"), (-1, 1, 1, 1)) * size
        valid = ops.take(ops.reshape(filled, (-1,)), ops.reshape(ops.cast(idx, "int32") + rows, (-1,)), axis=0)
        keep = ops.reshape(ops.cast(valid, key_db.dtype), (-1, heads, idx.shape[2], k, 1))
        keys, values = _gather_rows(key_db, idx) * keep, _gather_rows(value_db, idx) * keep
        if k < num_neighbors:  # more neighbours asked for than the memory holds: pad with zeros
            pad = [(0, 0)] * 3 + [(0, num_neighbors - k), (0, 0)]
            keys, values = ops.pad(keys, pad), ops.pad(values, pad)
        return keys, values
