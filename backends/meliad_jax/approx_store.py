"""The `jax_approx` memory store: approximate top-k with `jax.lax.approx_max_k`, on the device.

A device store (the memory is the model's variables, as for `exact`): each chunk of queries is scored
against every slot, unfilled slots are pushed to the bottom, and `approx_max_k` picks k slots per
query. On TPU that is the partial-reduction top-k (each query keeps the best slot of each of L
groups, then the top k of those), whose expected recall of the true top k is `recall_target`; on CPU
and GPU XLA lowers it to its exact fallback (`is_fallback`), so there the picks equal `exact`'s up to
ties. Picked slots are then gathered once (keys and values), and a pick that is not a filled slot
(fewer filled slots than k) becomes zeros, as in `exact`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meliad_core.extend import query_chunk_size
from meliad_jax import RECALL_TARGET


def _gather_rows(db, idx):
    """db (B, H, M, D), idx (B, H, N, k) slot numbers -> (B, H, N, k, D): one gather over the flat memory."""
    batch, heads, size, dim = db.shape
    base = (jnp.arange(batch, dtype=jnp.int32)[:, None, None, None] * heads
            + jnp.arange(heads, dtype=jnp.int32)[None, :, None, None]) * size
    rows = jnp.take(db.reshape(-1, dim), (idx.astype(jnp.int32) + base).reshape(-1), axis=0)
    return rows.reshape(idx.shape + (dim,))


class ApproxMaxKStore:
    """k approximate best-scoring filled slots per query (`jax.lax.approx_max_k`); missing neighbours are zeros."""

    def __init__(self, recall_target: float = RECALL_TARGET):
        self.recall_target = float(recall_target)

    def configure(self, options: dict) -> "ApproxMaxKStore":
        return ApproxMaxKStore(**options)

    def retrieve(self, key_db, value_db, filled, queries, num_neighbors: int, query_chunk: int = 0):
        key_db, value_db, queries = jnp.asarray(key_db), jnp.asarray(value_db), jnp.asarray(queries)
        filled = jnp.asarray(filled).astype(bool)
        batch, heads, size, _ = key_db.shape
        k = min(num_neighbors, size)
        n = queries.shape[2]
        chunk = query_chunk_size(batch, heads, n, size, query_chunk)
        fill = filled[:, None, None, :]
        floor = jnp.asarray(jnp.finfo(key_db.dtype).min, key_db.dtype)
        picks = []
        for i in range(0, n, chunk):
            scores = jnp.einsum("bhnd,bhmd->bhnm", queries[:, :, i:i + chunk].astype(key_db.dtype), key_db)
            scores = jnp.where(fill, scores, floor)
            picks.append(jax.lax.approx_max_k(scores, k, recall_target=self.recall_target)[1])
        idx = picks[0] if len(picks) == 1 else jnp.concatenate(picks, axis=2)  # (B, H, N, k)
        valid = jnp.take_along_axis(filled[:, None, None, :], idx.reshape(batch, 1, 1, -1), axis=-1)
        keep = valid.reshape(idx.shape)[..., None].astype(key_db.dtype)
        keys, values = _gather_rows(key_db, idx) * keep, _gather_rows(value_db, idx) * keep
        if k < num_neighbors:  # more neighbours asked for than the memory holds: pad with zeros
            pad = [(0, 0)] * 3 + [(0, num_neighbors - k), (0, 0)]
            keys, values = jnp.pad(keys, pad), jnp.pad(values, pad)
        return keys, values
