"""Built-in memory stores: `bucketed` (meliad's approximate kNN) and `exact` (true top-k) on the device,
`exact_host` (true top-k in host RAM, the reference host store)."""

from meliad_core.extend import LazyObject, hookimpl


@hookimpl
def meliad_register_memory_stores(register):
    register("bucketed", LazyObject("meliad_memory.stores:BucketedStore"),
             description="meliad's kNN: one winner per strided bucket, empty slots penalised")
    register("exact", LazyObject("meliad_memory.stores:ExactStore"), description="true top-k over the filled slots")
    register("exact_host", LazyObject("meliad_memory.host:ExactHostStore"),
             description="true top-k over a memory in host RAM (numpy): the reference host store")
