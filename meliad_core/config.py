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
SCHEDULES = ("cosine", "rsqrt", "rsqrt_std", "linear", "constant")
OPTIMIZERS = ("adafactor", "adam")


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
    position_buckets: int = 32
    position_max_distance: int = 128
    normalize_keys: bool = True
    logit_scale: str = field(default="sqrt_vocab", metadata=_choice(*LOGIT_SCALES))
    dtype: str = field(default="float32", metadata=_choice(*DTYPES))


@dataclass(frozen=True)
class AttentionConfig:
    """Local attention: window W inside a segment, XL cache of the previous W keys (spec §4)."""

    window: int = 512
    xl_cache: bool = True
    kernel: str = "auto"  # "auto" picks the fastest available kernel for the backend


@dataclass(frozen=True)
class MemoryConfig:
    """External kNN memory of the Memorizing Transformer (spec §7)."""

    layers: tuple[int, ...] = (-4,)
    store: str = "bucketed"
    size: int = 8192
    neighbors: int = 128
    query_chunk: int = 0  # queries scored at once (0: chosen to bound the score matrix); bounds peak memory


@dataclass(frozen=True)
class RecurrenceConfig:
    """Recurrent cell of the Block-Recurrent Transformer (spec §8)."""

    layers: tuple[int, ...] = (-3,)
    gate: str = "fixed"
    variant: str = field(default="skip", metadata=_choice(*GATE_VARIANTS))
    num_states: int = 512
    feedback: bool = False


@dataclass(frozen=True)
class DataConfig:
    """Where documents come from and how they are cut into segments (spec §9)."""

    source: str = "synthetic"
    vocabulary: str = "bytes"
    segment_length: int = 512
    batch_size: int = 8
    options: dict = field(default_factory=dict)  # source- and vocabulary-specific settings


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
class TrainConfig:
    steps: int = 1000
    optimizer: str = field(default="adafactor", metadata=_choice(*OPTIMIZERS))
    learning_rate: LearningRateConfig = field(default_factory=LearningRateConfig)
    warmup: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    loss_reduction: str = field(default="sum", metadata=_choice(*LOSS_REDUCTIONS))
    seed: int = 42


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1000
    steps: int = 10
    report_batches: int = 0  # > 0: end the run with the long-range report over this many eval batches


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


def validate_recipe(mapping: dict) -> Recipe:
    """Turns a resolved recipe mapping into a `Recipe`, or raises `RecipeError` with one line."""
    if not isinstance(mapping, dict):
        raise RecipeError(f"recipe: got {type(mapping).__name__}, expected a mapping of sections")
    mapping = {k: v for k, v in mapping.items() if k != "include"}
    recipe: Recipe = _build(Recipe, mapping, "")
    m, a, d, t = recipe.model, recipe.attention, recipe.data, recipe.train
    for key in ("num_layers", "embed_dim", "num_heads", "head_dim", "mlp_dim", "vocab_size",
                "position_buckets", "position_max_distance"):
        _positive(getattr(m, key), f"model.{key}")
    for key in ("dropout", "attn_dropout"):
        rate = getattr(m, key)
        _check(0.0 <= rate < 1.0, f"model.{key}: got {rate!r}, expected a rate in [0, 1)")
    _positive(a.window, "attention.window")
    _positive(d.segment_length, "data.segment_length")
    _positive(d.batch_size, "data.batch_size")
    _positive(t.steps, "train.steps", allow_zero=True)
    _positive(t.warmup, "train.warmup", allow_zero=True)
    _positive(t.checkpoint_every, "train.checkpoint_every")
    _positive(t.keep_checkpoints, "train.keep_checkpoints")
    _positive(t.log_every, "train.log_every")
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
        _check(
            mem.size % d.segment_length == 0,
            f"memory.size: got {mem.size}, expected a multiple of data.segment_length ({d.segment_length})",
        )
        _check(
            mem.size % mem.neighbors == 0,
            f"memory.size: got {mem.size}, expected a multiple of memory.neighbors ({mem.neighbors})",
        )
        _check(
            a.window == d.segment_length,
            f"attention.window: got {a.window}, expected data.segment_length ({d.segment_length}) when memory "
            "is used (the memory is queried once per segment, as in meliad)",
        )
    if recipe.recurrence is not None:
        _positive(recipe.recurrence.num_states, "recurrence.num_states")
        overlap = set(recipe.memory_layers) & set(recipe.recurrent_layers)
        _check(
            not overlap,
            f"recurrence.layers: layer {sorted(overlap)[0] if overlap else ''} is also a memory layer; "
            "expected a layer to be either recurrent or a memory layer",
        )
    return recipe
