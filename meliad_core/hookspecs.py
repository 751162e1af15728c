"""Hook specifications: the only way meliad_core reaches plugins and backends.

Plugins import from `meliad_core.extend` (the public plugin API), never from core's internals.

Each `register_*` hook receives a `register` function and calls it once per thing it provides:

    register(name, obj, *, backends=None, available=None, description="", options=None)

- `backends`: the Keras backends the object serves (None: all).
- `available`: a callable returning None when usable right now, or a one-line reason why not.
- `options`: {name: meliad_core.extend.Option} the plugin's own recipe options, set under the
  section's `options` key (`memory.options`, `attention.options`, `recurrence.options`,
  `model.position_options`). Core validates them with its one-line errors before any model is
  built and fills in the defaults. Objects used as they are (kernels, stores, gate factories) then
  receive them through `obj.configure(options) -> object to use`; position factories receive them
  as their `options=` argument.

Every implementation of a hook is called (there is no first-result-wins). Name clashes: the first
registration of a name wins and later ones are reported in `meliad plugins`; plugins are loaded in
entry-point name order with meliad's own distribution first for a shared name, so a third party can
add names but never shadow a built-in. Core itself registers the `reference` attention kernel (it
cannot be disabled). A plugin that raises is reported and skipped; the others still load.
Registration happens when a registry is first used (a recipe is checked or a model is built), and
must not import Keras or a framework: register `LazyObject`s or factories that import on call.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("meliad")
hookimpl = pluggy.HookimplMarker("meliad")


@hookspec
def meliad_register_attention_kernels(register):
    """Attention kernels: objects with `attend(q, k, v, *, bias=None, mask=None, scale=None, dropout_mask=None)`.

    q (B, G, Q, H, D) and k, v (B, G, K, H, D) hold G independent blocks (windows); bias (H, Q, K)
    is added to q·k before the per-head scale (H,) multiplies, as meliad does; mask (Q, K) bool
    keeps True entries (masked logits are −1e6, fully masked rows give zeros: meliad's safe
    softmax); dropout_mask (H, Q, K) multiplies the probabilities. Returns (B, G, Q, H, D).
    Called on every forward pass of every layer (inside compiled steps: use keras.ops or your
    backend's traceable ops). `attention.kernel: auto` picks, by name, the first available kernel
    registered for the running backend alone, else `reference`. A kernel is registered only with a
    test that compares it to `meliad_core.extend.reference_attend`.
    """


@hookspec
def meliad_register_memory_stores(register):
    """Memory stores, of two kinds. The memory itself is FIFO per (stream, batch row, head): each segment
    first retrieves, for every query, its k nearest keys in the memory as it was, then writes its own
    keys and values (whole segments); a row starting a document is emptied first.

    **Device stores** (`bucketed`, `exact`; any object with only this method): `retrieve(key_db,
    value_db, filled, queries, num_neighbors, query_chunk)`. The memory lives in the model's
    non-trainable variables, one per stream, and core's kNN memory layer does the resets and FIFO
    writes. key_db, value_db (B, H, M, D); filled (B, M) bool, the slots written so far; queries
    (B, H, N, D), without gradient. Returns (keys, values), each (B, H, N, num_neighbors, D); missing
    neighbours are zeros. query_chunk bounds how many queries are scored at once (0: the store
    chooses, e.g. with `meliad_core.extend.query_chunk_size`). Called inside the compiled step: use
    keras.ops. A store returning other shapes stops with one line naming it.

    **Host stores** (`host = True`; subclass `meliad_core.extend.HostMemoryStore`): the store owns the
    memory, in host RAM (an ANN index, say), with this lifecycle; arrays are numpy float32:

        new() -> store                                   a fresh instance, one per memory layer
        init(streams, batch, heads, dim, options, *, size)   once, when the model is built
        reset(stream, rows)                              empty these rows of this stream only
        retrieve(stream, queries, k) -> (keys, values)   queries (B, H, N, D) -> (B, H, N, k, D) each,
                                                         missing neighbours zeros
        write(stream, keys, values)                      (B, H, n, D): append per row, FIFO, keeping
                                                         the last `size` entries
        state() -> {name: ndarray};  load_state(state)   for checkpoints (no pickle): after load_state
                                                         the store must continue exactly as it would have

    Streams are the model's ("train", "eval", "predict"), each an independent memory. Core calls them
    from inside the compiled train/eval step through one host call per memory layer per segment
    (`meliad_core.host_calls`: io_callback on JAX, tf.numpy_function on TensorFlow, a plain call on
    torch), in the order reset → retrieve → write and in the order of the steps; no gradient flows
    through them, and a store author writes no backend code. Cost: one device→host copy of the
    segment's queries, keys and values and one host→device copy of the neighbours per memory layer
    per step, and the step waits for the host. `FifoRing` and `top_k_rows` in `meliad_core.extend`
    help with the raw FIFO memory and top-k merging. Declared options arrive through
    `configure(options)` (and again in `init`).
    """


@hookspec
def meliad_register_recurrence_gates(register):
    """Recurrence gates: factories `make_gate(width, hidden_dim, name) -> keras.layers.Layer`.

    Called when a recurrent layer is built, once per gated MLP of the cell (the post-attention
    projection, and in the dual and single variants the FFN). The layer's `call(state, update,
    hidden)` returns the new state (B, S, width): `update` is the MLP's output z (B, S, width) and
    `hidden` its last hidden activation (B, S, hidden_dim), which kernel-based gates read.
    """


@hookspec
def meliad_register_position_biases(register):
    """Position strategies: factories `make_position(*, num_heads, head_dim, window, options, name)`.

    Return a `meliad_core.extend.PositionStrategy` (a Keras layer) or None (no position information).
    Called once per transformer layer when the model is built. The strategy's
    `compute_bias(num_queries, num_keys, offset)` gives an additive (H, Q, K) bias or None, and
    `transform(queries, keys, offset)` may rewrite queries (B, G, Q, H, D) and keys (B, G, K, H, D)
    (rotary positions); query i of a block sits at key position i + offset.
    """


@hookspec
def meliad_register_data_sources(register):
    """Data sources: factories `open_source(data_config, split, seed) -> Sequence or iterable of documents`.

    Documents are `str` or `meliad_core.extend.Document`. The factory's `options` attribute lists the
    `data.options` keys it reads. Called when a batch stream is opened (train and eval).
    """


@hookspec
def meliad_register_vocabularies(register):
    """Vocabularies: factories `load_vocabulary(data_config) -> meliad_core.extend.Vocabulary`.

    The factory's `options` attribute lists the `data.options` keys it reads. Called when a run or a
    batch stream starts. Id 0 must be padding: it is never scored.
    """


@hookspec
def meliad_recipe_dirs():
    """Extra folders searched for recipes named in `include:` and on the command line.

    Returns a list of paths (str or pathlib.Path). Bundled recipes are searched first.
    """


@hookspec
def meliad_register_samplers(register):
    """Samplers for generation: objects with `sample(logits, rng) -> ids`.

    logits: a float32 numpy array (B, V) of next-token logits (banned ids, padding included, are
    −inf); rng: a `numpy.random.Generator` seeded by the caller (`--seed`, `generate(seed=...)`), the
    only randomness a sampler may use so that a seed reproduces a generation. Returns (B,) int ids.
    Called once per generated token, on the host, outside compiled code; `meliad generate` and
    `MeliadLM.generate(sampler=name, sampler_options=...)` resolve samplers by name. Declared
    `options` (temperature, k, p, ...) are validated and handed over through `configure(options)`.
    """


@hookspec
def meliad_register_commands(cli):
    """Lets a plugin add click commands to the `meliad` command group `cli`; none may replace one."""
