"""meliad-example-memory: a third-party memory store for meliad, registered by entry point.

It imports only meliad's public plugin API, `meliad_core.extend`.

`example_recent` ignores the query contents: every query gets the same `num_neighbors` keys and
values, those of the filled slots with the highest indices, newest first (or oldest first with the
store's own option `memory.options.newest_first: false`). meliad writes its memory as a FIFO in
index order, so until the memory wraps around these are the most recently written slots. Where
fewer slots are filled, the missing neighbours are zeros (as meliad's empty slots are).
"""

from __future__ import annotations

from pathlib import Path

from meliad_core.extend import Option, hookimpl

__version__ = "0.3.0"


class RecentStore:
    """The memory-store interface meliad's model calls: `retrieve(...) -> (keys, values)`."""

    def __init__(self, newest_first: bool = True):
        self.newest_first = newest_first

    def configure(self, options: dict) -> "RecentStore":
        """meliad hands over the validated options this plugin declares; returns the store to use."""
        return RecentStore(newest_first=options["newest_first"])

    def retrieve(self, key_db, value_db, filled, queries, num_neighbors: int, query_chunk: int = 0):
        """key_db, value_db: (B, H, M, D); filled: bool (B, M); queries: (B, H, N, D).

        Returns keys and values, each (B, H, N, num_neighbors, D). `query_chunk` is unused: every
        query gets the same neighbours, so there is no score matrix to bound.
        """
        from keras import ops  # imported on use: loading the plugin must not pick a Keras backend

        num_queries = queries.shape[2]
        filled_int = ops.cast(filled, "int32")  # (B, M)
        if self.newest_first:  # 0 for the highest filled index, 1 for the next one down, ...
            rank = ops.sum(filled_int, axis=-1, keepdims=True) - ops.cumsum(filled_int, axis=-1)
        else:  # 0 for the lowest filled index, ...
            rank = ops.cumsum(filled_int, axis=-1) - 1
        wanted = ops.reshape(ops.arange(num_neighbors, dtype="int32"), (1, num_neighbors, 1))
        select = ops.logical_and(ops.expand_dims(rank, 1) == wanted, ops.expand_dims(filled, 1))  # (B, k, M)
        select = ops.cast(select, key_db.dtype)
        keys = ops.einsum("bkm,bhmd->bhkd", select, key_db)
        values = ops.einsum("bkm,bhmd->bhkd", select, value_db)
        return (ops.repeat(ops.expand_dims(keys, 2), num_queries, axis=2),
                ops.repeat(ops.expand_dims(values, 2), num_queries, axis=2))


@hookimpl
def meliad_register_memory_stores(register):
    register("example_recent", RecentStore(),
             description="the most recently written slots, the same for every query (example plugin)",
             options={"newest_first": Option(bool, True, "order of the neighbours: newest (true) or oldest first")})


@hookimpl
def meliad_recipe_dirs():
    return [Path(__file__).resolve().parent / "recipes"]
