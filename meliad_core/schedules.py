"""meliad's learning-rate schedules with linear warmup (spec §10.2).

    T      = learning_rate.max_steps, or the run's total steps when that is None
    ramp   = min(t, warmup) / warmup            (1 when warmup = 0)
    t'     = max(t, warmup)                     (the schedule's clock is held at `warmup` during warmup)
    lr(t)  = schedule(t', T) · base_lr · multiplier · ramp

so the learning rate is 0 at t = 0 whenever there is a warmup, and the first update changes nothing.
`base_lr` is the optimizer's own learning rate in meliad's config: 1.0 for Adafactor (the default),
0.05 for Adam (see `meliad_core.optimizers.make_optimizer`).

The schedules, with `max`/`min` from `LearningRateConfig`:

    cosine       min + (max − min)·½(1 + cos(π·min(t', T)/T))   for t' ≤ T
                 2·min·½^(t'/T)                                for t' > T (halves every further T)
                 then, if spike_steps > 0: max(lr, spike_lr·(spike_steps − t')/spike_steps)
    linear       max + (min − max)·t'/T                        for t' ≤ T; the same halving after T
    rsqrt        min(min/√(max(t', 100)/T), max)
    rsqrt_std    1/√max(t', 100)                               ("standard rsqrt" of the papers)
    exponential  max·(min/max)^(t'/T)                          (meliad's lr_exponential_decay: max at
                 t' = 0, min at t' = T, and the same factor every further T, with no floor)
    constant     max

The halving after T of cosine and linear is meliad's lr_exponential_decay with max = 2·min.

Decision: `rsqrt_std` ignores `max` and `min`. meliad's gin leaves its optional clip (max_lr) at None,
and our `max` defaults to cosine's 0.01, which would cap the standard schedule's 0.0316 peak.
A `max_steps` (or total) of 0 is treated as 1 so the formulas stay finite. meliad has no gin file that
selects lr_exponential_decay; its formula is `optimizer_config.lr_exponential_decay` (old and head alike),
which needs max > min > 0 (recipes are checked for it).
"""

from __future__ import annotations

import dataclasses
import math

import keras
from keras import ops

from meliad_core.config import SCHEDULES, LearningRateConfig


@keras.saving.register_keras_serializable(package="meliad")
class MeliadSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """lr(t) = schedule(max(t, warmup), T) · base_lr · multiplier · min(t, warmup)/warmup (spec §10.2).

    Calling the schedule with a step (a Python int or a backend tensor, as the optimizer does inside
    a compiled train step) returns a float32 tensor built with `keras.ops`; `value_at(step)` returns
    the same value as a Python float, for logging.
    """

    def __init__(self, config: LearningRateConfig, warmup: int, total_steps: int, base_lr: float = 1.0):
        if config.schedule not in SCHEDULES:
            raise ValueError(f"learning_rate.schedule: got {config.schedule!r}, expected one of {SCHEDULES}")
        if warmup < 0:
            raise ValueError(f"warmup: got {warmup}, expected >= 0")
        if config.schedule == "exponential" and not (config.max > 0 and config.min > 0):
            raise ValueError(f"learning_rate: the exponential schedule needs max and min > 0, got "
                             f"max={config.max}, min={config.min}")
        self.config = config
        self.warmup = int(warmup)
        self.total_steps = int(total_steps)
        self.base_lr = float(base_lr)
        steps = config.max_steps if config.max_steps is not None else total_steps
        self.max_steps = max(int(steps), 1)

    # -- the schedule as a tensor function (used by the optimizer) ---------------------------------

    def __call__(self, step):
        c, T = self.config, float(self.max_steps)
        t = ops.cast(step, "float32")
        if self.warmup > 0:
            ramp = ops.minimum(t, float(self.warmup)) / float(self.warmup)
            t = ops.maximum(t, float(self.warmup))
        else:
            ramp = ops.ones_like(t)

        if c.schedule in ("cosine", "linear"):
            frac = ops.minimum(t, T) / T
            if c.schedule == "cosine":
                lr = c.min + (c.max - c.min) * 0.5 * (1.0 + ops.cos(math.pi * frac))
            else:
                lr = c.max + (c.min - c.max) * frac
            lr = ops.where(t > T, 2.0 * c.min * ops.power(0.5, t / T), lr)  # exponential, max = 2·min
            if c.schedule == "cosine" and c.spike_steps > 0:
                lr = ops.maximum(lr, c.spike_lr * (c.spike_steps - t) / c.spike_steps)
        elif c.schedule == "rsqrt":
            lr = ops.minimum(c.min / ops.sqrt(ops.maximum(t, 100.0) / T), c.max)
        elif c.schedule == "rsqrt_std":
            lr = 1.0 / ops.sqrt(ops.maximum(t, 100.0))
        elif c.schedule == "exponential":
            lr = c.max * ops.power(c.min / c.max, t / T)
        else:  # constant
            lr = c.max * ops.ones_like(t)
        return ops.cast(lr * (self.base_lr * c.multiplier) * ramp, "float32")

    # -- the same schedule in plain Python (for logs and reports) ----------------------------------

    def value_at(self, step: int) -> float:
        """The learning rate at optimizer step `step`, as a Python float."""
        c, T = self.config, float(self.max_steps)
        t = float(step)
        if self.warmup > 0:
            ramp = min(t, self.warmup) / self.warmup
            t = max(t, float(self.warmup))
        else:
            ramp = 1.0

        if c.schedule in ("cosine", "linear"):
            if t > T:
                lr = 2.0 * c.min * 0.5 ** (t / T)
            elif c.schedule == "cosine":
                lr = c.min + (c.max - c.min) * 0.5 * (1.0 + math.cos(math.pi * t / T))
            else:
                lr = c.max + (c.min - c.max) * t / T
            if c.schedule == "cosine" and c.spike_steps > 0:
                lr = max(lr, c.spike_lr * (c.spike_steps - t) / c.spike_steps)
        elif c.schedule == "rsqrt":
            lr = min(c.min / math.sqrt(max(t, 100.0) / T), c.max)
        elif c.schedule == "rsqrt_std":
            lr = 1.0 / math.sqrt(max(t, 100.0))
        elif c.schedule == "exponential":
            lr = c.max * (c.min / c.max) ** (t / T)
        else:  # constant
            lr = c.max
        return lr * self.base_lr * c.multiplier * ramp

    # -- serialisation ---------------------------------------------------------------------------

    def get_config(self):
        return {
            **dataclasses.asdict(self.config),
            "warmup": self.warmup,
            "total_steps": self.total_steps,
            "base_lr": self.base_lr,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        warmup = config.pop("warmup")
        total_steps = config.pop("total_steps")
        base_lr = config.pop("base_lr", 1.0)
        return cls(LearningRateConfig(**config), warmup=warmup, total_steps=total_steps, base_lr=base_lr)

    def __repr__(self):
        c = self.config
        return (f"MeliadSchedule({c.schedule}, max={c.max}, min={c.min}, T={self.max_steps}, "
                f"warmup={self.warmup}, base_lr={self.base_lr}, multiplier={c.multiplier})")
