"""meliad-hnswlib: the `hnsw` host memory store for meliad, registered by entry point.

Imports only meliad's public plugin API (`meliad_core.extend`); hnswlib is imported when a model
is built, and its absence is reported in one line (`meliad plugins`, and when a recipe names it).
"""

from __future__ import annotations

import importlib.util

from meliad_core.extend import LazyObject, Option, hookimpl

__version__ = "0.1.0"


def _available():
    if importlib.util.find_spec("hnswlib") is None:
        return "hnswlib is not installed (pip install hnswlib==0.8.0)"
    return None


@hookimpl
def meliad_register_memory_stores(register):
    register("hnsw", LazyObject("meliad_hnswlib.store:HnswStore"), available=_available,
             description="host-RAM HNSW indexes (hnswlib) per (stream, row, head), exact FIFO, approximate kNN",
             options={
                 "ef_search": Option(int, 128, "HNSW candidate list when searching (recall vs speed)", minimum=1),
                 "ef_construction": Option(int, 64, "HNSW candidate list when inserting", minimum=1),
                 "links": Option(int, 16, "HNSW links per node (M)", minimum=2, maximum=100),
                 "blocks": Option(int, 4, "sub-indexes the memory is split into (a ring of blocks+1)", minimum=1),
                 "threads": Option(int, 0, "threads for queries (0: all cores); inserts are single-threaded",
                                   minimum=0),
             })
