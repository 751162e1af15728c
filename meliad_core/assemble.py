"""The one place where names become objects: a validated recipe in, plugins resolved, plain values out.

Every plugin name in a recipe (`attention.kernel`, `model.position_bias`, `memory.store`,
`recurrence.gate`, `data.source`, `data.vocabulary`) is looked up here, its own declared options
are validated here (`memory.options.nprobe`, ...), and the decoder's arguments are derived here.
Layers receive plain values (sizes, rates, plugin names and option dicts, all serialisable with
`get_config`) and ask this module for the strategy objects those names stand for.

Importing this module does not import Keras: `check_recipe` runs before any backend is chosen.
"""

from __future__ import annotations

from typing import Any

from meliad_core import plugins
from meliad_core.config import Recipe, RecipeError
from meliad_core.options import validate_options

# (section, key) -> (plugin kind, the recipe key of that plugin's own options or None)
PLUGIN_KEYS: dict[tuple[str, str], tuple[str, str | None]] = {
    ("model", "position_bias"): ("position_bias", "model.position_options"),
    ("attention", "kernel"): ("attention_kernel", "attention.options"),
    ("memory", "store"): ("memory_store", "memory.options"),
    ("recurrence", "gate"): ("recurrence_gate", "recurrence.options"),
    ("data", "source"): ("data_source", None),  # data.options is shared by source and vocabulary
    ("data", "vocabulary"): ("vocabulary", None),
}

PLURALS = {
    "position_bias": "position biases",
    "attention_kernel": "attention kernels",
    "memory_store": "memory stores",
    "recurrence_gate": "recurrence gates",
    "data_source": "data sources",
    "vocabulary": "vocabularies",
}


def _backend(backend: str | None) -> str:
    if backend is not None:
        return backend
    import keras

    return keras.backend.backend()


def entry(kind: str, name: str, backend: str | None = None) -> plugins.Entry:
    """The registry entry of `kind` called `name`, checked usable (on `backend`, if given)."""
    found = plugins.get_plugin_manager().get(kind, name)
    reason = found.unavailable_reason(backend)
    if reason:
        raise plugins.PluginError(f"{kind.replace('_', ' ')} {name!r} from {found.distribution} is not available: "
                                  f"{reason}")
    return found


def resolve(kind: str, name: str, backend: str | None = None) -> Any:
    """The object registered as `name`, for kinds whose objects take no options (data sources, vocabularies)."""
    return entry(kind, name, backend).obj


def options_for(kind: str, name: str, given: dict | None, prefix: str) -> dict:
    """The plugin's declared options with `given` validated against them and defaults filled in."""
    found = plugins.get_plugin_manager().get(kind, name)
    return validate_options(found.options, given, prefix, f"{kind.replace('_', ' ')} {name!r}")


def _configured(found: plugins.Entry, options: dict):
    """A plugin that declares options gets them through `configure(options)`, which returns the strategy."""
    if not found.options:
        return found.obj
    return found.obj.configure(dict(options))


# ----------------------------------------------------------------------------------------------
# Strategies, asked for by the layers


def attention_kernel(name: str = "auto", options: dict | None = None, backend: str | None = None):
    """The kernel `name`; with "auto" the first kernel registered for this backend alone that is
    available now (by name), else the portable `reference` kernel that core registers itself."""
    backend = _backend(backend)
    if name == "auto":
        manager = plugins.get_plugin_manager()
        name = "reference"
        for candidate in manager.names("attention_kernel"):
            found = manager.get("attention_kernel", candidate)
            if found.backends is not None and found.unavailable_reason(backend) is None:
                name = candidate
                break
    found = entry("attention_kernel", name, backend)
    return _configured(found, options_for("attention_kernel", name, options, "attention.options"))


def position_strategy(name: str, options: dict | None, *, num_heads: int, head_dim: int, window: int,
                      layer_name: str = "relative_positions", backend: str | None = None):
    """A new position layer (or None) from the plugin `name`'s factory."""
    found = entry("position_bias", name, _backend(backend))
    validated = options_for("position_bias", name, options, "model.position_options")
    return found.obj(num_heads=num_heads, head_dim=head_dim, window=window, options=validated, name=layer_name)


def memory_store(name: str, options: dict | None = None, backend: str | None = None):
    found = entry("memory_store", name, _backend(backend))
    return _configured(found, options_for("memory_store", name, options, "memory.options"))


def recurrence_gate(name: str, options: dict | None = None, backend: str | None = None):
    """The gate factory `make_gate(width, hidden_dim, name) -> keras Layer`."""
    found = entry("recurrence_gate", name, _backend(backend))
    return _configured(found, options_for("recurrence_gate", name, options, "recurrence.options"))


def sampler(name: str, options: dict | None = None):
    """The generation sampler `name` (an object with `sample(logits, rng)`), configured with `options`."""
    found = entry("sampler", name)
    return _configured(found, options_for("sampler", name, options, "sampler"))


# ----------------------------------------------------------------------------------------------
# Recipes


def check_recipe(recipe: Recipe, backend: str | None = None) -> None:
    """Raises a one-line `RecipeError` if the recipe names a strategy that no installed plugin
    registers, or gives a plugin an option it does not declare or a bad value for one.

    With `backend`, also checks that each named plugin serves that Keras backend and is available.
    """
    manager = plugins.get_plugin_manager()
    for (section, key), (kind, options_key) in PLUGIN_KEYS.items():
        config = getattr(recipe, section)
        if config is None:
            continue
        value = getattr(config, key)
        dotted = f"{section}.{key}"
        if kind == "attention_kernel" and value == "auto":
            if getattr(config, "options", None):
                raise RecipeError("attention.options: got options, but attention.kernel is auto; name the kernel "
                                  "whose options these are")
            continue
        registry = manager.registry(kind)
        if value not in registry:
            known = ", ".join(sorted(registry)) or "none installed"
            failed = {f.plugin for f in manager.failures}
            note = f"; {len(failed)} plugin(s) failed to load, see 'meliad plugins'" if failed else ""
            raise RecipeError(f"{dotted}: got {value!r}, expected one of the installed {PLURALS[kind]}: {known}{note}")
        found = registry[value]
        if backend is not None:
            reason = found.unavailable_reason(backend)
            if reason:
                raise RecipeError(f"{dotted}: got {value!r} (from {found.distribution}), which is not available "
                                  f"on the {backend} backend: {reason}")
        if options_key is not None:
            section_name, field = options_key.split(".")
            options_for(kind, value, getattr(getattr(recipe, section_name), field), options_key)


def memory_arguments(recipe: Recipe) -> dict | None:
    """The memory layer's arguments (plain values), or None without memory."""
    mem = recipe.memory
    if mem is None:
        return None
    storage = recipe.model.dtype if mem.dtype == "auto" else mem.dtype
    return {"size": mem.size, "neighbors": mem.neighbors, "store": mem.store, "store_options": dict(mem.options),
            "query_chunk": mem.query_chunk, "query_stride": mem.query_stride, "update_stride": mem.update_stride,
            "reset_on_new_document": mem.reset_on_new_document, "storage_dtype": storage,
            "gate_init": mem.gate_init, "empty": mem.empty}


def recurrence_arguments(recipe: Recipe) -> dict | None:
    """The recurrent cell's arguments (plain values), or None without recurrence."""
    rec = recipe.recurrence
    if rec is None:
        return None
    return {"num_states": rec.num_states, "variant": rec.variant, "gate": rec.gate, "gate_options": dict(rec.options)}


def stack_arguments(recipe: Recipe, vocab_size: int) -> dict:
    """Everything `DecoderStack(**arguments)` needs, as plain (serialisable) values."""
    m, a = recipe.model, recipe.attention
    return {
        "vocab_size": vocab_size,
        "num_layers": m.num_layers, "embed_dim": m.embed_dim, "num_heads": m.num_heads, "head_dim": m.head_dim,
        "mlp_dim": m.mlp_dim, "dropout": m.dropout, "attn_dropout": m.attn_dropout,
        "final_dropout": m.dropout if m.final_dropout is None else m.final_dropout,
        "normalize_keys": m.normalize_keys, "logit_scale": m.logit_scale,
        "attention_scale_init": m.attention_scale_init, "smear_keys": m.smear_keys,
        "absolute_positions": m.absolute_positions, "position": m.position_bias,
        "position_options": dict(m.position_options),
        "mlp_activation": m.mlp_activation, "mlp_use_bias": m.mlp_use_bias,
        "norm_use_mean": m.norm_use_mean, "norm_use_bias": m.norm_use_bias,
        "use_causal_mask": m.use_causal_mask, "embedding_stddev": m.embedding_stddev,
        "use_final_layernorm": m.use_final_layernorm, "final_mlp": m.final_mlp,
        "window": a.window, "xl_cache": a.xl_cache, "kernel": a.kernel, "kernel_options": dict(a.options),
        "memory_layers": list(recipe.memory_layers), "memory": memory_arguments(recipe),
        "recurrent_layers": list(recipe.recurrent_layers), "recurrence": recurrence_arguments(recipe),
        "feedback": bool(recipe.recurrence and recipe.recurrence.feedback),
        "seed": recipe.train.seed,
    }
