"""Training on several devices through `keras.distribution` (JAX): data parallel, state sharded by row.

A batch row is one document stream, so a device that takes rows b..b+k of the batch also takes rows
b..b+k of every stream's carried state: the XL caches, the kNN memories and the recurrent states are
sharded along their batch axis (never replicated: a 32k-entry memory is split, not copied), while
the weights and the optimizer state are replicated. JAX places the arrays and XLA inserts the
gradient all-reduce; nothing here is home-made.

    distribution = make_distribution(recipe.distribution, recipe.data.batch_size)
    with distribution.scope():        # build, compile and train inside the scope
        model = build_model(recipe)
"""

from __future__ import annotations

from meliad_core.config import DistributionConfig, RecipeError

BATCH_AXIS = "batch"

# state variable names end in the mechanism's state key (model.py: state_{stream}_{layer}_{key});
# the layout names the batch axis first and leaves the other axes whole
STATE_LAYOUTS = {
    r".*state_.*_(keys|values)$": (BATCH_AXIS, None, None, None),  # XL cache and kNN memory: (B, ·, ·, ·)
    r".*state_.*_memory_index$": (BATCH_AXIS,),  # (B,)
    r".*state_.*_recurrent_state$": (BATCH_AXIS, None, None),  # (B, S, E)
}


def make_distribution(config: DistributionConfig | None, batch_size: int):
    """The `keras.distribution.Distribution` for `config`, or None for one device.

    Raises RecipeError (one line) on a backend other than JAX, more devices than there are, or a
    batch that does not split into whole rows per device.
    """
    if config is None:
        return None
    import keras

    backend = keras.backend.backend()
    if backend != "jax":
        raise RecipeError(f"distribution: got {config.kind}, which needs the jax backend; on {backend} meliad "
                          "trains on one device (remove the distribution section)")
    devices = keras.distribution.list_devices()
    wanted = config.devices or len(devices)
    if wanted > len(devices):
        raise RecipeError(f"distribution.devices: got {wanted}, but JAX sees {len(devices)} device(s)")
    if batch_size % wanted:
        raise RecipeError(f"distribution.devices: {wanted} devices, expected a divisor of data.batch_size "
                          f"({batch_size}): each device takes whole batch rows")
    mesh = keras.distribution.DeviceMesh((wanted,), [BATCH_AXIS], devices[:wanted])
    layout_map = keras.distribution.LayoutMap(mesh)
    for pattern, axes in STATE_LAYOUTS.items():
        layout_map[pattern] = axes
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name=BATCH_AXIS)


def device_count(distribution) -> int:
    return 1 if distribution is None else int(distribution.device_mesh.devices.size)
