"""Built-in memory stores: `bucketed` (meliad's approximate kNN) and `exact` (true top-k)."""

from meliad_core.hookspecs import hookimpl
from meliad_memory.stores import BucketedStore, ExactStore


@hookimpl
def meliad_register_memory_stores(register):
    register("bucketed", BucketedStore(),
             description="meliad's kNN: one winner per strided bucket, empty slots penalised")
    register("exact", ExactStore(), description="true top-k over the filled slots")
