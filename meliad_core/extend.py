"""The public API for plugins: everything a plugin may import from meliad_core.

Importing this module does not import Keras: the names that need it (layers, kernels, helpers)
load on first use, so a plugin's `__init__` can register LazyObjects and factories for free.

Hooks (see `meliad_core.hookspecs` for each one's contract):

    meliad_register_attention_kernels(register)   objects with attend(q, k, v, *, bias, mask, scale, dropout_mask)
    meliad_register_memory_stores(register)       device stores: retrieve(key_db, value_db, filled, queries, k, chunk);
                                                  host stores (HostMemoryStore): init, reset, write, retrieve(stream,
                                                  queries, k), state, load_state, driven by core through host calls
    meliad_register_recurrence_gates(register)    factories make_gate(width, hidden_dim, name) -> keras Layer
    meliad_register_position_biases(register)     factories make_position(*, num_heads, head_dim, window,
                                                  options, name) -> PositionStrategy | None
    meliad_register_data_sources(register)        factories open_source(data_config, split, seed)
    meliad_register_vocabularies(register)        factories load_vocabulary(data_config)
    meliad_recipe_dirs()                          folders of recipes
    meliad_register_commands(cli)                 click commands
    meliad_register_samplers(register)            objects with sample(logits, rng) -> ids (generation)

`register(name, obj, *, backends=None, available=None, description="", options=None)`; `options`
declares the plugin's own recipe options (`{"nprobe": Option(int, 8, minimum=1)}`), validated with
core's one-line errors and handed to the object's `configure(options)` (which returns the strategy
to use) before a model is built.
"""

from __future__ import annotations

from meliad_core.config import RecipeError
from meliad_core.hookspecs import hookimpl
from meliad_core.options import Option
from meliad_core.plugins import LazyObject, PluginError

_LAZY = {
    # attention
    "reference_attend": "meliad_core.layers.attention",
    "safe_softmax": "meliad_core.layers.attention",
    "window_mask": "meliad_core.layers.attention",
    "relative_positions": "meliad_core.layers.attention",
    "AttentionKernel": "meliad_core.layers.attention",
    "MASK_VALUE": "meliad_core.layers.attention",
    # positions
    "PositionStrategy": "meliad_core.layers.positions",
    # memory
    "MemoryStore": "meliad_core.layers.knn_memory",
    "HostMemoryStore": "meliad_core.host_store",  # the host-store lifecycle (no Keras needed)
    "FifoRing": "meliad_core.host_store",
    "top_k_rows": "meliad_core.host_store",
    "is_host_store": "meliad_core.host_store",
    "query_chunk_size": "meliad_core.layers.knn_memory",
    # recurrence
    "RecurrenceGate": "meliad_core.layers.block_recurrence",
    # building blocks
    "kernel_init": "meliad_core.layers.common",
    "split_heads": "meliad_core.layers.common",
    "merge_heads": "meliad_core.layers.common",
    "l2_normalize": "meliad_core.layers.common",
    # generation
    "Sampler": "meliad_core.sampling",
    "softmax": "meliad_core.sampling",
    "top_k_filter": "meliad_core.sampling",
    "top_p_filter": "meliad_core.sampling",
    "categorical": "meliad_core.sampling",
    # data
    "Document": "meliad_core.data",
    "Vocabulary": "meliad_core.vocab",
}

__all__ = ["LazyObject", "Option", "PluginError", "RecipeError", "hookimpl", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'meliad_core.extend' has no attribute {name!r}")
