"""Hook specifications: the only way meliad_core reaches plugins and backends.

Each `register_*` hook receives a `register` function and calls it once per thing it provides:

    register(name, obj, *, backends=None, available=None, description="")

`backends` is the Keras backends the object serves (None means all); `available` is a callable
returning None when usable right now, or a one-line reason why not. Every implementation of a hook
is called (no first-result-wins); a plugin that raises is reported and skipped, the others still load.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("meliad")
hookimpl = pluggy.HookimplMarker("meliad")


@hookspec
def meliad_register_attention_kernels(register):
    """Attention kernels: objects with `attend(q, k, v, *, bias, mask, scale, dropout_mask)`.

    Called when the kernel registry is first used. See `meliad_core.layers.attention.AttentionKernel`.
    """


@hookspec
def meliad_register_memory_stores(register):
    """Memory stores: objects with `retrieve(key_db, value_db, filled, queries, num_neighbors, query_chunk)`.

    See `meliad_core.layers.memory.MemoryStore`.
    """


@hookspec
def meliad_register_recurrence_gates(register):
    """Recurrence gates: factories `make_gate(width, name) -> keras.layers.Layer`.

    See `meliad_core.layers.recurrence.RecurrenceGate`.
    """


@hookspec
def meliad_register_position_biases(register):
    """Position biases: factories `make_bias(num_heads, model_config, name) -> keras.layers.Layer | None`."""


@hookspec
def meliad_register_data_sources(register):
    """Data sources: factories `open_source(data_config, split, seed) -> iterable of documents`."""


@hookspec
def meliad_register_vocabularies(register):
    """Vocabularies: factories `load_vocabulary(data_config) -> meliad_core.vocab.Vocabulary`."""


@hookspec
def meliad_recipe_dirs():
    """Extra folders searched for recipes named in `include:` and on the command line.

    Returns a list of paths (str or pathlib.Path).
    """


@hookspec
def meliad_register_commands(cli):
    """Lets a plugin add click commands to the `meliad` command group `cli`."""
