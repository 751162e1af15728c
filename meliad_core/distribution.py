"""Training on several devices and hosts through `keras.distribution` (JAX only).

A batch row is one document stream, so a device that takes rows b..b+k of the batch also takes rows
b..b+k of every stream's carried state: the XL caches, the kNN memories and the recurrent states are
sharded along their batch axis (never replicated: a 32k-entry memory is split, not copied).

- `data_parallel`: a 1-D mesh ('batch'); weights and optimizer state replicated.
- `model_parallel`: a 2-D mesh ('batch', 'model'); the embedding, the q/k/v/out projections and the FFN
  are split over 'model' (column- then row-parallel, Megatron-style), the batch rows and the state over
  'batch'. The optimizer's slots follow their weights.

JAX places the arrays and XLA inserts the collectives; nothing here is home-made.

    distribution = make_distribution(recipe.distribution, recipe.data.batch_size)
    with distribution.scope():        # build, compile and train inside the scope
        model = build_model(recipe)

Several hosts: `start_processes` (before anything runs on JAX) joins `jax.distributed` through
`keras.distribution.initialize`; the mesh then spans every host's devices. Each process feeds its own
rows of the global batch (`local_rows`), and Keras builds the global arrays from them
(`jax.make_array_from_process_local_data`, inside `train_on_batch`). `host_value` gathers a sharded
variable so that process 0 can write it.

Data: with `data.assignment: round_robin` a slot's documents depend only on the slot's index
(meliad_core.data), so each process reads only its own slots (`data_rows`); the characters of each
batch (for bits/char) and the slots' positions (for checkpoints) are gathered from every process
(`gather_rows`), so process 0's checkpoint holds every slot's position and a run resumes on any number
of hosts with the same documents in the same slots. With the default `first_free` a slot whose
document ends takes the next document of one order shared by all slots, which depends on every
other slot's document lengths: every process then streams the whole global batch (reading and
tokenizing every document) and feeds only its rows.
"""

from __future__ import annotations

import numpy as np

from meliad_core.config import DistributionConfig, RecipeError

BATCH_AXIS, MODEL_AXIS = "batch", "model"

# state variable names end in the mechanism's state key (model.py: state_{stream}_{layer}_{key});
# the layout names the batch axis first and leaves the other axes whole
STATE_LAYOUTS = {
    r".*state_.*_(keys|values)$": (BATCH_AXIS, None, None, None),  # XL cache and kNN memory: (B, ·, ·, ·)
    r".*state_.*_memory_index$": (BATCH_AXIS,),  # (B,)
    r".*state_.*_recurrent_state$": (BATCH_AXIS, None, None),  # (B, S, E)
}

# model_parallel: weight paths (model.py, layers/block.py, layers/block_recurrence.py) -> their split.
# (E, out) projections are split by output column, (in, E) projections by input row, so that each
# attention / FFN block needs one all-reduce; the embedding (V, E) is split along E. Adafactor's
# full-size slots (`<weight path with _>_m`, `_v`) are split like their weight (Adam's slots take their
# weight's layout by themselves); its factored row/column slots are vectors and stay replicated.
_COLUMNS, _ROWS = r"(queries2?|keys|values|ffn_hidden)", r"(post_attn|ffn_output)"
WEIGHT_LAYOUTS = {
    r".*/decoder/embedding": (None, MODEL_AXIS),
    r".*/transformer\d+/(recurrent_tbase/)?" + _COLUMNS: (None, MODEL_AXIS),
    r".*/transformer\d+/(recurrent_tbase/)?" + _ROWS: (MODEL_AXIS, None),
    r".*_decoder_embedding_(m|v)": (None, MODEL_AXIS),
    r".*_transformer\d+_(recurrent_tbase_)?" + _COLUMNS + "_(m|v)": (None, MODEL_AXIS),
    r".*_transformer\d+_(recurrent_tbase_)?" + _ROWS + "_(m|v)": (MODEL_AXIS, None),
}


def start_processes(coordinator: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None) -> None:
    """Joins this process to a multi-host run (`jax.distributed.initialize`, through Keras).

    With no arguments the cluster is found by JAX itself (Cloud TPU pod slices, SLURM, Open MPI) or
    from KERAS_DISTRIBUTION_JOB_ADDRESSES / _NUM_PROCESSES / _PROCESS_ID. Must run before any JAX
    computation. Raises RunFault (one line) when the cluster cannot be joined.
    """
    import keras

    from meliad_core.runner import RunFault
    from meliad_core.units import one_line

    if keras.backend.backend() != "jax":
        raise RecipeError(f"multi-host training needs the jax backend; on {keras.backend.backend()} meliad trains "
                          "on one device")
    try:
        keras.distribution.initialize(coordinator, num_processes, process_id)
    except Exception as exc:  # jax raises RuntimeError/ValueError with multi-line text
        where = f" at {coordinator}" if coordinator else ""
        raise RunFault(f"cannot join the multi-host run{where}: {one_line(exc)}") from exc


def make_distribution(config: DistributionConfig | None, batch_size: int):
    """The `keras.distribution.Distribution` for `config`, or None for one device.

    Raises RecipeError (one line) on a backend other than JAX, more devices than there are, or a
    batch that does not split into whole rows per model replica (and per process).
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
    model = config.model_axis or 1
    if wanted % model:
        raise RecipeError(f"distribution.model_axis: got {model}, expected a divisor of the {wanted} devices")
    replicas = wanted // model
    if batch_size % replicas:
        what = "devices" if model == 1 else f"model replicas ({wanted} devices / model_axis {model})"
        raise RecipeError(f"distribution.devices: {replicas} {what}, expected a divisor of data.batch_size "
                          f"({batch_size}): each takes whole batch rows")
    if model == 1:
        mesh = keras.distribution.DeviceMesh((wanted,), [BATCH_AXIS], devices[:wanted])
    else:
        mesh = keras.distribution.DeviceMesh((replicas, model), [BATCH_AXIS, MODEL_AXIS], devices[:wanted])
    layout_map = keras.distribution.LayoutMap(mesh)
    for pattern, axes in STATE_LAYOUTS.items():
        layout_map[pattern] = axes
    if model > 1:
        for pattern, axes in WEIGHT_LAYOUTS.items():
            layout_map[pattern] = axes
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name=BATCH_AXIS,
                                                    auto_shard_dataset=False)
    processes = distribution.num_processes
    if processes > 1:
        if wanted != len(devices):
            raise RecipeError(f"distribution.devices: got {wanted}; a multi-host run uses every device of every "
                              f"host ({len(devices)})")
        if replicas % processes or batch_size % processes:
            raise RecipeError(f"distribution: {processes} processes, expected a divisor of the {replicas} model "
                              f"replicas and of data.batch_size ({batch_size}): each host takes whole batch rows")
        local_rows(distribution, batch_size)  # checks that each host's rows are one block
    return distribution


def device_count(distribution) -> int:
    return 1 if distribution is None else int(distribution.device_mesh.devices.size)


def process_count(distribution) -> int:
    return 1 if distribution is None else int(distribution.num_processes)


def is_chief(distribution) -> bool:
    """True in the process that logs and writes (process 0; the only one without jax.distributed)."""
    return distribution is None or distribution.num_processes == 1 or distribution.data_shard_id == 0


def describe(distribution) -> str:
    """One line for the run's log."""
    mesh = distribution.device_mesh
    shape = " x ".join(f"{size} {name}" for size, name in zip(mesh.shape, mesh.axis_names))
    kind = "data parallel" if len(mesh.shape) == 1 else "model parallel"
    hosts = f" on {distribution.num_processes} hosts" if distribution.num_processes > 1 else ""
    return f"{kind} over {device_count(distribution)} devices ({shape}){hosts}: every stream's state split by batch row"


def local_rows(distribution, batch_size: int) -> slice:
    """The rows of the global batch that this process feeds (all of them with one process): the rows
    its devices hold under the data layout, which must form one block."""
    if distribution is None or distribution.num_processes == 1:
        return slice(0, batch_size)
    sharding = distribution.get_data_layout((batch_size,)).backend_layout
    rows = sorted({row for index in sharding.addressable_devices_indices_map((batch_size,)).values()
                   for row in range(batch_size)[index[0]]})
    if not rows or rows != list(range(rows[0], rows[-1] + 1)):
        raise RecipeError(f"distribution: this host's devices hold batch rows {rows}, expected one block of rows "
                          "(order the devices by host)")
    return slice(rows[0], rows[-1] + 1)


def data_rows(distribution, data_config) -> slice | None:
    """The batch slots this process reads from the data source: its own rows in a multi-host run with
    `data.assignment: round_robin`; None (every slot) otherwise."""
    if process_count(distribution) == 1 or data_config.assignment != "round_robin":
        return None
    return local_rows(distribution, data_config.batch_size)


def gather_rows(distribution, values: np.ndarray, rows: slice) -> np.ndarray:
    """`values` (batch, ...) of which this process holds `rows`, with every other process's rows filled
    in from that process: a collective every process must join in the same order (one process: as is)."""
    if process_count(distribution) == 1:
        return values
    # Keras has no public host-to-host gather; jax.distributed is already running (multi-host is JAX's)
    from jax.experimental import multihost_utils

    starts, blocks = multihost_utils.process_allgather((np.asarray([rows.start]), np.asarray(values[rows])))
    gathered = np.array(values, copy=True)
    for start, block in zip(np.asarray(starts).reshape(-1), np.asarray(blocks)):
        gathered[int(start):int(start) + len(block)] = block
    return gathered


def host_value(value):
    """A variable's value as one numpy array, in every process: a value sharded over several hosts is
    first gathered (resharded to replicated, a collective every process must join in the same order)."""
    import keras

    if not getattr(value, "is_fully_addressable", True) and not getattr(value, "is_fully_replicated", False):
        distribution = keras.distribution.distribution()
        if distribution is None:
            raise RuntimeError("a value sharded over several hosts, outside a distribution scope")
        layout = keras.distribution.TensorLayout([None] * len(value.shape), distribution.device_mesh)
        value = keras.distribution.distribute_tensor(value, layout)
    return np.array(keras.ops.convert_to_numpy(value), copy=True)


def check_agreement(distribution, values: list[int], what: str) -> None:
    """Raises RunFault unless every process passes the same `values` (e.g. the step it resumes from).

    JAX itself compares a host value placed on every host's devices and refuses one that differs.
    """
    if process_count(distribution) == 1:
        return
    import keras

    from meliad_core.runner import RunFault

    layout = keras.distribution.TensorLayout([None], distribution.device_mesh)
    try:
        keras.distribution.distribute_tensor(np.asarray(values, dtype=np.int32), layout)
    except ValueError as exc:
        raise RunFault(f"the {distribution.num_processes} processes do not agree on {what} (this one has {values}); "
                       "every host must see the same workdir (a shared file system) and recipe") from exc
