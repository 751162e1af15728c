"""Typed configuration objects that a resolved recipe is validated into.

A recipe is data: after includes and overrides are merged, `validate_recipe` turns the plain
mapping into these frozen dataclasses, or raises `RecipeError` with one line naming the dotted key,
the bad value and what was expected. Nothing is built from an unvalidated recipe.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line meant for the user."""


LOGIT_SCALES = ("sqrt_vocab", "sqrt_embed", "none")
DTYPES = ("float32", "bfloat16")
GATE_VARIANTS = ("skip", "single", "dual")
LOSS_REDUCTIONS = ("sum", "mean")
SCHEDULES = ("cosine", "rsqrt", "rsqrt_std", "linear", "exponential", "constant")
OPTIMIZERS = ("adafactor", "adam")
ACTIVATIONS = ("relu", "gelu", "swish", "tanh", "sigmoid")
MEMORY_DTYPES = ("auto", "float32", "bfloat16")
ASSIGNMENTS = ("first_free", "round_robin")


def _choice(*options: str) -> dict:
    return {"choices": options}


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of the decoder stack (spec §5)."""

    num_layers: int = 12
    embed_dim: int = 512
    num_heads: int = 8
    head_dim: int = 128
    mlp_dim: int = 2048
    vocab_size: int | None = None  # None: taken from the data vocabulary
    dropout: float = 0.05
    attn_dropout: float = 0.05
    position_bias: str = "t5"
    absolute_positions: bool = False  # sinusoids added to the embeddings (meliad's use_absolute_positions)
    normalize_keys: bool = True
    attention_scale_init: float = 1.0  # initial learned attention scale with normalised keys (meliad: 1)
    smear_keys: bool = False  # beyond meliad: each key mixes in the previous token's key (layers/block.py)
    logit_scale: str = field(default="sqrt_vocab", metadata=_choice(*LOGIT_SCALES))
    dtype: str = field(default="float32", metadata=_choice(*DTYPES))
    position_options: dict = field(default_factory=dict)  # options the position plugin declares
    mlp_activation: str = field(default="relu", metadata=_choice(*ACTIVATIONS))  # the FFN's hidden activation
    mlp_use_bias: bool = False  # biases in the FFN, the post-attention projection and the final MLP
    norm_use_mean: bool = False  # False: RMSNorm (meliad); True: mean-centred LayerNorm
    norm_use_bias: bool = False  # a learned bias after every norm
    use_causal_mask: bool = True  # False: every token sees its whole window, before and after (bidirectional)
    embedding_stddev: float = 1.0
    use_final_layernorm: bool = True
    final_dropout: float | None = None  # dropout before the logits; None: model.dropout (meliad's gin)
    final_mlp: bool = False  # an E -> mlp_dim -> E relu MLP before the logits (options/final_mlp.gin)
    loss_mask_ids: tuple[int, ...] = ()  # target token ids that are never scored (besides padding id 0)


@dataclass(frozen=True)
class AttentionConfig:
    """Local attention: window W inside a segment, XL cache of the previous W keys (spec §4)."""

    window: int = 512
    xl_cache: bool = True
    kernel: str = "auto"  # "auto" picks the fastest available kernel for the backend
    options: dict = field(default_factory=dict)  # options the kernel plugin declares


@dataclass(frozen=True)
class MemoryConfig:
    """External kNN memory of the Memorizing Transformer (spec §7)."""

    layers: tuple[int, ...] = (-4,)
    store: str = "bucketed"
    size: int = 8192
    neighbors: int = 128
    query_chunk: int = 0  # queries scored at once (0: chosen to bound the score matrix); bounds peak memory
    query_stride: int = 1  # only every s-th query retrieves (the others get zeros), as meliad's BatchedMemory
    update_stride: int = 1  # only every s-th key/value is written
    reset_on_new_document: bool = True  # False: a row keeps its memory across documents
    dtype: str = field(default="auto", metadata=_choice(*MEMORY_DTYPES))  # storage; auto: model.dtype
    gate_init: float = 0.0  # initial gate bias b, g = σ(b); meliad: 0 (half of every head from the memory)
    empty: str = field(default="zeros", metadata=_choice("zeros", "mask"))  # never-written neighbours
    options: dict = field(default_factory=dict)  # options the store plugin declares


@dataclass(frozen=True)
class RecurrenceConfig:
    """Recurrent cell of the Block-Recurrent Transformer (spec §8)."""

    layers: tuple[int, ...] = (-3,)
    gate: str = "fixed"
    variant: str = field(default="skip", metadata=_choice(*GATE_VARIANTS))
    num_states: int = 512
    feedback: bool = False
    options: dict = field(default_factory=dict)  # options the gate plugin declares


@dataclass(frozen=True)
class DataConfig:
    """Where documents come from and how they are cut into segments (spec §9)."""

    source: str = "synthetic"
    vocabulary: str = "bytes"
    segment_length: int = 512
    batch_size: int = 8
    options: dict = field(default_factory=dict)  # source- and vocabulary-specific settings
    # which slot reads which document: first_free (a slot whose document ends takes the next one of the
    # shared order) or round_robin (document k of the order always goes to slot k mod batch_size, so a
    # slot's documents do not depend on the other slots: a host can read its own slots only)
    assignment: str = field(default="first_free", metadata=_choice(*ASSIGNMENTS))


@dataclass(frozen=True)
class LearningRateConfig:
    """Learning-rate schedule with linear warmup (spec §10.2)."""

    schedule: str = field(default="cosine", metadata=_choice(*SCHEDULES))
    max: float = 0.01
    min: float = 0.001
    max_steps: int | None = None  # None: train.steps
    multiplier: float = 1.0
    spike_steps: int = 0
    spike_lr: float = 0.0


@dataclass(frozen=True)
class AdafactorConfig:
    """meliad's FlaxAdafactorConfig (flax.optim.Adafactor, spec §10.1); read when train.optimizer is adafactor."""

    base_lr: float = 1.0  # meliad's FlaxAdafactorConfig.learning_rate: multiplies the schedule
    beta1: float | None = 0.9  # momentum on the scaled step; null (or 0): none
    decay_rate: float = 0.8  # second-moment decay ρ_t = 1 − (t+1)^−decay_rate
    min_scale: float = 1e-3  # flax's epsilon2: the floor of the parameter scale in step = lr·max(RMS(p), floor)·u
    small_size: int = 0  # beyond meliad: parameters with fewer elements than this (0: none) ...
    small_lr_multiplier: float = 1.0  # ... have their learning rate multiplied by this (docs/long_range.md)


@dataclass(frozen=True)
class AdamConfig:
    """meliad's AdamConfig (flax.optim.Adam, old defaults, spec §10.1); read when train.optimizer is adam."""

    base_lr: float = 0.05  # meliad's AdamConfig.learning_rate: multiplies the schedule
    beta1: float = 0.9
    beta2: float = 0.98
    weight_decay: float = 0.0  # meliad's weight_decay_rate: decoupled, p -= lr·weight_decay·p, every parameter


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    optimizer: str = field(default="adafactor", metadata=_choice(*OPTIMIZERS))
    learning_rate: LearningRateConfig = field(default_factory=LearningRateConfig)
    adafactor: AdafactorConfig = field(default_factory=AdafactorConfig)
    adam: AdamConfig = field(default_factory=AdamConfig)
    warmup: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    loss_reduction: str = field(default="sum", metadata=_choice(*LOSS_REDUCTIONS))
    seed: int = 42
    compile: bool | None = None  # compile the train/eval step (torch.compile on torch); null: the backend's default


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1000
    steps: int = 10
    report_batches: int = 0  # > 0: end the run with the long-range report over this many eval batches


@dataclass(frozen=True)
class DistributionConfig:
    """Training on several devices (JAX): batch rows, and every stream's state with them, split across devices."""

    kind: str = field(default="data_parallel", metadata=_choice("data_parallel", "model_parallel"))
    devices: int | None = None  # None: every device JAX sees (on every host)
    # model_parallel: devices per model replica (the mesh's 'model' axis); the big weights (embedding,
    # q/k/v/out projections, FFN) are split over it, the batch rows (and the state) over the rest
    model_axis: int | None = None


@dataclass(frozen=True)
class Recipe:
    """A whole, validated run description."""

    name: str = ""
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    memory: MemoryConfig | None = None
    recurrence: RecurrenceConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distribution: DistributionConfig | None = None  # absent: one device

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def layer_indices(self, which: tuple[int, ...]) -> tuple[int, ...]:
        """Resolves meliad-style layer indices (negative counts from the top)."""
        return tuple(sorted({i % self.model.num_layers for i in which}))

    @property
    def memory_layers(self) -> tuple[int, ...]:
        return self.layer_indices(self.memory.layers) if self.memory else ()

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        return self.layer_indices(self.recurrence.layers) if self.recurrence else ()


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# Validation


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in args) + " or null"
    if origin is tuple:
        item = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}.get(item, str(item))
        return f"a list of {plural}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(
        tp, str(tp)
    )


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if dataclasses.is_dataclass(inner[0]) and value is None:
            return None
        return _convert(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: got {value!r}, expected a mapping")
        return _build(tp, value, key)
    if origin is tuple:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: got {value!r}, expected {_describe(tp)}")
        return tuple(_convert(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: got {value!r}, expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: got {value!r}, expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: got {value!r}, expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}: got {value!r}, expected a string")
        return value
    if tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: got {value!r}, expected a mapping")
        return dict(value)
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def _build(cls: type, mapping: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{(prefix + '.' if prefix else '') + close[0]}'?" if close else ""
            known = ", ".join(fields)
            raise RecipeError(f"{dotted}: unknown key{hint} (known keys here: {known})")
        converted = _convert(value, hints[key], dotted)
        choices = fields[key].metadata.get("choices")
        if choices and converted not in choices:
            raise RecipeError(f"{dotted}: got {converted!r}, expected one of {', '.join(choices)}")
        kwargs[key] = converted
    return cls(**kwargs)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RecipeError(message)


def _positive(value: int | float | None, key: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    ok = value >= 0 if allow_zero else value > 0
    _check(ok, f"{key}: got {value!r}, expected a {'non-negative' if allow_zero else 'positive'} number")


# keys of earlier versions -> where they live now
MOVED_KEYS = {
    ("model", "position_buckets"): "model.position_options.num_buckets",
    ("model", "position_max_distance"): "model.position_options.max_distance",
}


# the defaults the moved keys had, which a recipe stored before the move may hold
MOVED_DEFAULTS = {("model", "position_buckets"): 32, ("model", "position_max_distance"): 128}


def migrate_stored_recipe(mapping: dict) -> dict:
    """A recipe stored by an earlier version (a run's manifest) in today's keys: moved keys move (and
    vanish where they held their old default, which is the plugin's default now)."""
    mapping = {key: dict(value) if isinstance(value, dict) else value for key, value in mapping.items()}
    for (section, key), new in MOVED_KEYS.items():
        values = mapping.get(section)
        if not isinstance(values, dict) or key not in values:
            continue
        value = values.pop(key)
        if value != MOVED_DEFAULTS[(section, key)]:
            _, holder, option = new.split(".")
            values[holder] = {**(values.get(holder) or {}), option: value}
    return mapping


def _check_moved_keys(mapping: dict) -> None:
    for (section, key), new in MOVED_KEYS.items():
        if isinstance(mapping.get(section), dict) and key in mapping[section]:
            raise RecipeError(f"{section}.{key}: this key moved to {new} (the t5 plugin's own option)")


# schedules whose meliad function asserts max_lr > min_lr (spec §10.2)
_DECAYING_SCHEDULES = ("cosine", "rsqrt", "linear", "exponential")


def _check_train(recipe: Recipe) -> None:
    """The optimizer's and the learning-rate schedule's own keys (spec §10.1, §10.2)."""
    t, lr = recipe.train, recipe.train.learning_rate

    def unit(value: float, key: str, closed: bool = False) -> None:
        ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
        _check(ok, f"{key}: got {value!r}, expected a number in [0, 1{']' if closed else ')'}")

    _positive(t.adafactor.base_lr, "train.adafactor.base_lr")
    if t.adafactor.beta1 is not None:
        unit(t.adafactor.beta1, "train.adafactor.beta1")
    unit(t.adafactor.decay_rate, "train.adafactor.decay_rate", closed=True)
    _positive(t.adafactor.min_scale, "train.adafactor.min_scale")
    _positive(t.adafactor.small_size, "train.adafactor.small_size", allow_zero=True)
    _positive(t.adafactor.small_lr_multiplier, "train.adafactor.small_lr_multiplier")
    _positive(t.adam.base_lr, "train.adam.base_lr")
    unit(t.adam.beta1, "train.adam.beta1")
    unit(t.adam.beta2, "train.adam.beta2")
    _positive(t.adam.weight_decay, "train.adam.weight_decay", allow_zero=True)

    _positive(lr.max, "train.learning_rate.max", allow_zero=True)
    _positive(lr.min, "train.learning_rate.min", allow_zero=lr.schedule != "exponential")
    _positive(lr.max_steps, "train.learning_rate.max_steps")
    _positive(lr.multiplier, "train.learning_rate.multiplier", allow_zero=True)
    _positive(lr.spike_steps, "train.learning_rate.spike_steps", allow_zero=True)
    _positive(lr.spike_lr, "train.learning_rate.spike_lr", allow_zero=True)
    if lr.schedule in _DECAYING_SCHEDULES:
        _check(lr.max > lr.min, f"train.learning_rate.max: got {lr.max!r}, expected more than "
               f"train.learning_rate.min ({lr.min!r}) for the {lr.schedule} schedule")
    if lr.schedule == "cosine" and lr.spike_steps > 0 and lr.spike_lr > 0:
        _check(lr.spike_lr > lr.max, f"train.learning_rate.spike_lr: got {lr.spike_lr!r}, expected more than "
               f"train.learning_rate.max ({lr.max!r})")


# Upper bounds on sizes and counts, checked before anything is allocated: far above any real run
# (meliad's largest model is 12 layers of width 2048 with 16384-wide MLPs), far below what would hang
# or exhaust a machine while being built.
MAX_STEPS = 2**31 - 1
SIZE_LIMITS = {
    "model.num_layers": 1024,
    "model.embed_dim": 1 << 16,
    "model.num_heads": 1024,
    "model.head_dim": 1 << 12,
    "model.mlp_dim": 1 << 20,
    "model.vocab_size": 1 << 24,
    "attention.window": 1 << 20,
    "data.segment_length": 1 << 20,
    "data.batch_size": 1 << 16,
    "memory.size": 1 << 24,
    "memory.neighbors": 1 << 16,
    "memory.query_chunk": 1 << 20,
    "recurrence.num_states": 1 << 16,
    "train.steps": MAX_STEPS,
    "train.warmup": MAX_STEPS,
    "train.checkpoint_every": MAX_STEPS,
    "train.keep_checkpoints": 1 << 20,
    "train.log_every": MAX_STEPS,
    "train.learning_rate.max_steps": MAX_STEPS,
    "train.learning_rate.spike_steps": MAX_STEPS,
    "eval.every": MAX_STEPS,
    "eval.steps": MAX_STEPS,
    "eval.report_batches": 1 << 20,
}
MAX_LIST = 1 << 16  # entries of a list key (layer indices, masked token ids)
MAX_ELEMENTS = 1 << 36  # numbers in the weights, in one stream's state, or in one step's largest activation
MAX_SEED = 2**32 - 1


def _dotted(recipe: Recipe, key: str) -> Any:
    value: Any = recipe
    for part in key.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _finite_floats(config: Any, prefix: str) -> None:
    import math

    for f in dataclasses.fields(config):
        value, key = getattr(config, f.name), f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            _finite_floats(value, key)
        elif isinstance(value, float):
            _check(math.isfinite(value), f"{key}: got {value!r}, expected a finite number")


def _check_bounds(recipe: Recipe) -> None:
    """Bounds on every size (with the limit named) and on seeds, names and floats, so that absurd
    values stop here, before a model, a memory or a data stream is allocated."""
    _finite_floats(recipe, "")
    for key, limit in SIZE_LIMITS.items():
        value = _dotted(recipe, key)
        if isinstance(value, int) and value > limit:
            _check(False, f"{key}: got {value}, expected at most {limit} (meliad's bound on this size, which "
                          "stops absurd values before anything is allocated)")
    m, d, a = recipe.model, recipe.data, recipe.attention
    for key in ("memory.layers", "recurrence.layers", "model.loss_mask_ids"):
        value = _dotted(recipe, key)
        if value is not None and len(value) > MAX_LIST:
            _check(False, f"{key}: got {len(value)} entries, expected at most {MAX_LIST}")
    if m.vocab_size is not None:
        for i, token_id in enumerate(m.loss_mask_ids):
            _check(token_id < m.vocab_size, f"model.loss_mask_ids[{i}]: got {token_id}, expected an id below "
                                            f"model.vocab_size ({m.vocab_size})")
    seed = recipe.train.seed
    _check(seed is None or 0 <= seed <= MAX_SEED, f"train.seed: got {seed}, expected an integer in [0, {MAX_SEED}]")
    name = recipe.name
    _check(len(name) <= 200 and "/" not in name and "\\" not in name and name not in (".", "..")
           and name.isprintable(), f"name: got {name[:200]!r}, expected a plain name (it names the default "
           "workdir runs/<name>): no slashes, at most 200 characters")

    # what the sizes multiply to: weights, one stream's state, one step's largest activations
    B, N, W, L = d.batch_size, d.segment_length, a.window, m.num_layers
    E, H, D, M, V = m.embed_dim, m.num_heads, m.head_dim, m.mlp_dim, m.vocab_size or 0
    mem, rec = recipe.memory, recipe.recurrence
    n_mem = len(recipe.memory_layers) if mem else 0
    n_rec = len(recipe.recurrent_layers) if rec else 0
    weights = V * E + (L + n_rec) * (4 * E * H * D + 2 * E * M) + (n_rec * rec.num_states * E if rec else 0)
    state = (L * B * W * H * D * 2 if a.xl_cache else 0) + (n_mem * B * mem.size * H * D * 2 if mem else 0) \
        + (n_rec * B * rec.num_states * E if rec else 0)
    activations = max(B * N * max(V, M, E, H * D), B * H * N * 2 * W)
    for what, count, keys in (
        ("the weights", weights, "model.num_layers, model.embed_dim, model.num_heads, model.head_dim, "
                                 "model.mlp_dim or model.vocab_size"),
        ("one stream's caches and memories", state, "data.batch_size, attention.window, memory.size or "
                                                    "recurrence.num_states"),
        ("one step's activations", activations, "data.batch_size, data.segment_length or attention.window"),
    ):
        _check(count <= MAX_ELEMENTS, f"{keys.split(',')[0]}: {what} would hold about {count:.3g} numbers, "
                                      f"expected at most {MAX_ELEMENTS:.3g}; reduce {keys}")


def validate_recipe(mapping: dict) -> Recipe:
    """Turns a resolved recipe mapping into a `Recipe`, or raises `RecipeError` with one line."""
    if not isinstance(mapping, dict):
        raise RecipeError(f"recipe: got {type(mapping).__name__}, expected a mapping of sections")
    mapping = {k: v for k, v in mapping.items() if k != "include"}
    _check_moved_keys(mapping)
    recipe: Recipe = _build(Recipe, mapping, "")
    m, a, d, t = recipe.model, recipe.attention, recipe.data, recipe.train
    for key in ("num_layers", "embed_dim", "num_heads", "head_dim", "mlp_dim", "vocab_size"):
        _positive(getattr(m, key), f"model.{key}")
    for key in ("dropout", "attn_dropout"):
        rate = getattr(m, key)
        _check(0.0 <= rate < 1.0, f"model.{key}: got {rate!r}, expected a rate in [0, 1)")
    _positive(m.embedding_stddev, "model.embedding_stddev")
    _positive(m.attention_scale_init, "model.attention_scale_init")
    if m.final_dropout is not None:
        _check(0.0 <= m.final_dropout < 1.0, f"model.final_dropout: got {m.final_dropout!r}, expected a rate in [0, 1)")
    for i, token_id in enumerate(m.loss_mask_ids):
        _check(token_id > 0, f"model.loss_mask_ids[{i}]: got {token_id}, expected a positive token id (0 is "
                             "padding and never scored)")
    _positive(a.window, "attention.window")
    _positive(d.segment_length, "data.segment_length")
    _positive(d.batch_size, "data.batch_size")
    _positive(t.steps, "train.steps", allow_zero=True)
    _positive(t.warmup, "train.warmup", allow_zero=True)
    _positive(t.checkpoint_every, "train.checkpoint_every")
    _positive(t.keep_checkpoints, "train.keep_checkpoints")
    _positive(t.log_every, "train.log_every")
    _check_train(recipe)
    _positive(recipe.eval.every, "eval.every")
    _positive(recipe.eval.steps, "eval.steps", allow_zero=True)
    _positive(recipe.eval.report_batches, "eval.report_batches", allow_zero=True)
    _check(
        d.segment_length % a.window == 0,
        f"data.segment_length: got {d.segment_length}, expected a multiple of attention.window ({a.window})",
    )
    _check(
        a.xl_cache or a.window == d.segment_length,
        f"attention.window: got {a.window}, expected data.segment_length ({d.segment_length}) when "
        "attention.xl_cache is false (a sliding window needs the XL cache)",
    )
    for section, cfg in (("memory", recipe.memory), ("recurrence", recipe.recurrence)):
        if cfg is None:
            continue
        _check(len(cfg.layers) > 0, f"{section}.layers: got [], expected at least one layer index")
        for i, index in enumerate(cfg.layers):
            _check(
                -m.num_layers <= index < m.num_layers,
                f"{section}.layers[{i}]: got {index}, expected an index in [{-m.num_layers}, {m.num_layers - 1}] "
                f"(model.num_layers is {m.num_layers}; negative counts from the top)",
            )
    if recipe.memory is not None:
        mem = recipe.memory
        _positive(mem.size, "memory.size")
        _positive(mem.neighbors, "memory.neighbors")
        _positive(mem.query_chunk, "memory.query_chunk", allow_zero=True)
        for key in ("query_stride", "update_stride"):
            stride = getattr(mem, key)
            _positive(stride, f"memory.{key}")
            _check(d.segment_length % stride == 0,
                   f"memory.{key}: got {stride}, expected a divisor of data.segment_length ({d.segment_length})")
        written = d.segment_length // mem.update_stride  # entries written per segment
        _check(
            mem.size % written == 0,
            f"memory.size: got {mem.size}, expected a multiple of the entries written per segment ({written} = "
            f"data.segment_length / memory.update_stride)",
        )
        _check(
            mem.size % mem.neighbors == 0,
            f"memory.size: got {mem.size}, expected a multiple of memory.neighbors ({mem.neighbors})",
        )
        # attention.window < data.segment_length is allowed, as meliad allows it (its comment advises
        # against it, spec 7.1): the memory holds whole earlier segments, so a token sees its window and
        # the earlier segments, not the part of its own segment before its window. The recall and books
        # demos use it (docs/long_range.md, experiment 17).
    if recipe.recurrence is not None:
        _positive(recipe.recurrence.num_states, "recurrence.num_states")
        overlap = set(recipe.memory_layers) & set(recipe.recurrent_layers)
        _check(
            not overlap,
            f"recurrence.layers: layer {sorted(overlap)[0] if overlap else ''} is also a memory layer; "
            "expected a layer to be either recurrent or a memory layer",
        )
    _check_bounds(recipe)
    _check_distribution(recipe)
    return recipe


def _check_distribution(recipe: Recipe) -> None:
    dist = recipe.distribution
    if dist is None:
        return
    _positive(dist.devices, "distribution.devices")
    _positive(dist.model_axis, "distribution.model_axis")
    if dist.kind != "model_parallel":
        _check(dist.model_axis is None, f"distribution.model_axis: got {dist.model_axis}, which needs "
               f"distribution.kind: model_parallel (the kind is {dist.kind})")
        if dist.devices is not None:
            _check(recipe.data.batch_size % dist.devices == 0,
                   f"distribution.devices: got {dist.devices}, expected a divisor of data.batch_size "
                   f"({recipe.data.batch_size}): each device takes whole batch rows")
        return
    axis = dist.model_axis
    _check(axis is not None and axis >= 2, f"distribution.model_axis: got {axis}, expected the number of devices "
           "each weight is split over (2 or more) with distribution.kind: model_parallel")
    m = recipe.model
    for key, size in (("model.embed_dim", m.embed_dim), ("model.num_heads * model.head_dim", m.num_heads * m.head_dim),
                      ("model.mlp_dim", m.mlp_dim)):
        _check(size % axis == 0, f"distribution.model_axis: got {axis}, expected a divisor of {key} ({size}): "
               "each device takes an equal slice of the weights")
    if dist.devices is not None:
        _check(dist.devices % axis == 0, f"distribution.devices: got {dist.devices}, expected a multiple of "
               f"distribution.model_axis ({axis})")
        replicas = dist.devices // axis
        _check(recipe.data.batch_size % replicas == 0,
               f"distribution.devices: {dist.devices} devices make {replicas} model replicas of {axis}, expected "
               f"a divisor of data.batch_size ({recipe.data.batch_size}): each replica takes whole batch rows")
