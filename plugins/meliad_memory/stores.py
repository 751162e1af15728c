"""kNN lookups over the external memory (spec §7.3), written with keras.ops."""

from __future__ import annotations

from keras import ops

from meliad_core.extend import query_chunk_size

EMPTY_PENALTY = -1e6
ONE_HOT_SHARPNESS = 1e6


def _chunks(queries, chunk: int):
    n = queries.shape[2]
    return [queries[:, :, i:i + chunk] for i in range(0, n, chunk)]


class BucketedStore:
    """meliad's retrieval: slot i is in bucket i mod k; each bucket gives the slot with the best score.

    The winner is picked with softmax(scores·1e6) over the bucket (ties are averaged, as in meliad),
    and slots whose key sums to zero count as empty (score −1e6). A memory with no written slot in
    a bucket returns zeros for that neighbour.
    """

    def retrieve(self, key_db, value_db, filled, queries, num_neighbors: int, query_chunk: int = 0):
        key_db, value_db, filled, queries = (ops.convert_to_tensor(t) for t in (key_db, value_db, filled, queries))
        batch, heads, size, dim = key_db.shape[0], key_db.shape[1], key_db.shape[2], key_db.shape[3]
        k = num_neighbors
        per_bucket = size // k
        empty = ops.sum(key_db, axis=-1) == 0  # (B, H, M)
        penalty = ops.where(empty, ops.cast(EMPTY_PENALTY, key_db.dtype), ops.cast(0.0, key_db.dtype))
        keys_b = ops.reshape(key_db, (-1, heads, per_bucket, k, dim))
        values_b = ops.reshape(value_db, (-1, heads, per_bucket, k, dim))
        chunk = query_chunk_size(batch or 1, heads, queries.shape[2], size, query_chunk)
        out_k, out_v = [], []
        for q in _chunks(queries, chunk):
            scores = ops.einsum("bhnd,bhmd->bhnm", q, key_db) + penalty[:, :, None, :]
            scores = ops.reshape(scores, (-1, heads, q.shape[2], per_bucket, k))
            # Shift by the bucket maximum before sharpening: the same softmax, but XLA would otherwise
            # turn an all-empty bucket (every score −1e6, times 1e6) into NaN.
            shifted = scores - ops.stop_gradient(ops.max(scores, axis=3, keepdims=True))
            weights = ops.softmax(shifted * ONE_HOT_SHARPNESS, axis=3)
            out_k.append(ops.einsum("bhnjk,bhjkd->bhnkd", weights, keys_b))
            out_v.append(ops.einsum("bhnjk,bhjkd->bhnkd", weights, values_b))
        return ops.concatenate(out_k, axis=2), ops.concatenate(out_v, axis=2)


class ExactStore:
    """The k best-scoring filled slots for each query; missing neighbours (fewer than k filled) are zeros."""

    def retrieve(self, key_db, value_db, filled, queries, num_neighbors: int, query_chunk: int = 0):
        key_db, value_db, filled, queries = (ops.convert_to_tensor(t) for t in (key_db, value_db, filled, queries))
        batch, heads, size, dim = key_db.shape[0], key_db.shape[1], key_db.shape[2], key_db.shape[3]
        k = min(num_neighbors, size)
        chunk = query_chunk_size(batch or 1, heads, queries.shape[2], size, query_chunk)
        fill = ops.reshape(filled, (-1, 1, 1, size))
        out_k, out_v = [], []
        for q in _chunks(queries, chunk):
            n = q.shape[2]
            scores = ops.einsum("bhnd,bhmd->bhnm", q, key_db)
            scores = ops.where(fill, scores, ops.cast(-1e30, scores.dtype))
            _, idx = ops.top_k(scores, k=k, sorted=True)  # (B, H, n, k)
            valid = ops.take_along_axis(ops.broadcast_to(fill, (ops.shape(scores)[0], heads, n, size)), idx, axis=3)
            flat = ops.reshape(idx, (-1, heads, n * k, 1))
            gathered_k = ops.take_along_axis(key_db, ops.broadcast_to(flat, (ops.shape(flat)[0], heads, n * k, dim)),
                                             axis=2)
            gathered_v = ops.take_along_axis(value_db,
                                             ops.broadcast_to(flat, (ops.shape(flat)[0], heads, n * k, dim)), axis=2)
            keep = ops.cast(valid, key_db.dtype)[..., None]
            out_k.append(ops.reshape(gathered_k, (-1, heads, n, k, dim)) * keep)
            out_v.append(ops.reshape(gathered_v, (-1, heads, n, k, dim)) * keep)
        keys, values = ops.concatenate(out_k, axis=2), ops.concatenate(out_v, axis=2)
        if k < num_neighbors:  # more neighbours asked for than the memory holds: pad with zeros
            pad = [(0, 0)] * 3 + [(0, num_neighbors - k), (0, 0)]
            keys, values = ops.pad(keys, pad), ops.pad(values, pad)
        return keys, values
