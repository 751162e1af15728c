"""meliad's optimizer: Adafactor with flax's semantics (spec §10.1, §13 item 10), and `make_optimizer`.

Keras 3's own `keras.optimizers.Adafactor` is a different algorithm (no momentum, always factors the
last two dims, caps the step at 1/√t, computes in the variable's dtype), so meliad needs this one.
"""

from __future__ import annotations

import keras
from keras import ops

from meliad_core.config import TrainConfig
from meliad_core.schedules import MeliadSchedule

ADAM_EPSILON = 1e-8  # flax.optim.Adam's eps (meliad does not set it)


def factored_dims(shape, min_dim_size_to_factor: int = 128) -> tuple[int, int] | None:
    """The axes (largest, second_largest) that Adafactor factors over, or None for a full second moment.

    Axes are ranked by size; among equal sizes the later axis counts as the larger, so a square
    (n, n) matrix factors like any (rows, cols) matrix: R averages over the last axis, C over the
    first. The parameter is factored only if it has rank >= 2 and both of these axes have at least
    `min_dim_size_to_factor` entries (i.e. the second largest does).
    """
    if len(shape) < 2:
        return None
    ranked = sorted(range(len(shape)), key=lambda axis: (shape[axis], axis))
    largest, second = ranked[-1], ranked[-2]
    if shape[second] < min_dim_size_to_factor:
        return None
    return largest, second


def _rms(x):
    return ops.sqrt(ops.mean(ops.square(x)))


def _dense_float32(gradient, shape):
    """The gradient as a dense float32 tensor. TensorFlow hands embedding lookups' gradients over as
    sparse row slices (they have `indices` and `dense_shape`); adding them to zeros densifies them,
    summing repeated rows. Adafactor's second moment and RMS need every entry."""
    if hasattr(gradient, "indices") and hasattr(gradient, "dense_shape"):
        return ops.add(ops.zeros(shape, "float32"), ops.cast(gradient, "float32"))
    return ops.cast(gradient, "float32")


@keras.saving.register_keras_serializable(package="meliad")
class Adafactor(keras.optimizers.Optimizer):
    """Adafactor as in flax (`flax.optim.Adafactor(beta1=0.9)`), which meliad trains with.

    For each parameter p with gradient g, at optimizer step t = iterations − step_offset (0 first):

        ρ  = 1 − (t + 1)^(−decay_rate)                        (0 at the first step)
        G  = g² + epsilon1
        factored (two largest axes a (largest), b (second) both >= min_dim_size_to_factor):
            R = ρ·R + (1 − ρ)·mean_a(G)                        (one value per index along b)
            C = ρ·C + (1 − ρ)·mean_b(G)                        (one value per index along a)
            v̂ = R·C / mean_b(R)                                (v̂[i, j] = R[i]·C[j] / mean(R))
        otherwise:
            v̂ = v = ρ·v + (1 − ρ)·G
        u    = g / √v̂
        u    = u / max(1, RMS(u)/clipping_threshold)           (update clipping; off if None)
        step = lr · s · max(RMS(p), epsilon2) · u              (RMS(p) only if multiply_by_parameter_scale)
        s    = small_lr_multiplier if p has fewer than small_size elements, else 1 (not in flax; off by default)
        m    = beta1·m + (1 − beta1)·step;   p ← p − m         (beta1 None: no momentum, p ← p − step)

    epsilon2 is the floor of the parameter scale (flax's 1e-3): a parameter initialised to zeros (meliad's
    memory gate bias) moves lr·1e-3 per step, 1e-5 at lr 0.01, and barely leaves its initial value in a
    short run. `small_size`/`small_lr_multiplier` (or a larger epsilon2) let such scalars and vectors
    learn at short budgets (docs/long_range.md); the defaults are flax's, which meliad trains with.

    RMS is over the whole parameter. Axes other than a and b (rank > 2) are kept as batch axes: R and C
    are stored with a size-1 axis in place of a (resp. b). All accumulators (R, C, v, m) are float32
    whatever the parameter's dtype, and the update is computed in float32 and cast back.

    `learning_rate` is the full lr: meliad passes its schedule (`MeliadSchedule`) with base lr 1.0.
    There is no gradient clipping besides update clipping and no weight decay unless `weight_decay`
    is given, in which case Keras applies p ← p − lr·weight_decay·p before the update (as flax does
    with its weight_decay_rate).
    """

    def __init__(
        self,
        learning_rate=1.0,
        beta1: float | None = 0.9,
        decay_rate: float = 0.8,
        step_offset: int = 0,
        factored: bool = True,
        min_dim_size_to_factor: int = 128,
        clipping_threshold: float | None = 1.0,
        epsilon1: float = 1e-30,
        epsilon2: float = 1e-3,
        multiply_by_parameter_scale: bool = True,
        small_size: int = 0,
        small_lr_multiplier: float = 1.0,
        name: str = "adafactor",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta1 = beta1
        self.decay_rate = decay_rate
        self.step_offset = step_offset
        self.factored = factored
        self.min_dim_size_to_factor = min_dim_size_to_factor
        self.clipping_threshold = clipping_threshold
        self.epsilon1 = epsilon1
        self.epsilon2 = epsilon2
        self.multiply_by_parameter_scale = multiply_by_parameter_scale
        self.small_size = int(small_size)
        self.small_lr_multiplier = float(small_lr_multiplier)

    def lr_multiplier(self, shape) -> float:
        """The learning-rate multiplier of a parameter of this shape: `small_lr_multiplier` if it has fewer
        than `small_size` elements (0: none has), else 1."""
        size = 1
        for n in shape:
            size *= int(n)
        return self.small_lr_multiplier if size < self.small_size else 1.0

    def _factored_dims(self, shape):
        if not self.factored:
            return None
        return factored_dims(tuple(shape), self.min_dim_size_to_factor)

    def _slot(self, variable, shape, suffix):
        base = variable.path.replace("/", "_") if hasattr(variable, "path") else str(variable.name)
        return self.add_variable(shape=tuple(shape), initializer="zeros", dtype="float32",
                                 name=f"{base}_{suffix}")

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        # One entry per variable, in var_list order; None where a slot does not apply.
        self._v_row, self._v_col, self._v, self._m = [], [], [], []
        for var in var_list:
            shape = tuple(var.shape)
            v_row = v_col = v = m = None
            if not self._overwrite_variable_with_gradient(var):
                dims = self._factored_dims(shape)
                if dims is None:
                    v = self._slot(var, shape, "v")
                else:
                    largest, second = dims
                    v_row = self._slot(var, [1 if a == largest else n for a, n in enumerate(shape)], "v_row")
                    v_col = self._slot(var, [1 if a == second else n for a, n in enumerate(shape)], "v_col")
                if self.beta1:
                    m = self._slot(var, shape, "m")
            self._v_row.append(v_row)
            self._v_col.append(v_col)
            self._v.append(v)
            self._m.append(m)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        g = _dense_float32(gradient, tuple(variable.shape))
        p = ops.cast(variable, "float32")
        lr = ops.cast(learning_rate, "float32")

        t = ops.cast(self.iterations, "float32") - float(self.step_offset)
        rho = 1.0 - ops.power(t + 1.0, -float(self.decay_rate))
        G = ops.square(g) + self.epsilon1

        dims = self._factored_dims(variable.shape)
        if dims is None:
            v = self._v[index]
            new_v = rho * v + (1.0 - rho) * G
            self.assign(v, new_v)
            u = g / ops.sqrt(new_v)
        else:
            largest, second = dims
            v_row, v_col = self._v_row[index], self._v_col[index]
            new_row = rho * v_row + (1.0 - rho) * ops.mean(G, axis=largest, keepdims=True)
            new_col = rho * v_col + (1.0 - rho) * ops.mean(G, axis=second, keepdims=True)
            self.assign(v_row, new_row)
            self.assign(v_col, new_col)
            v_hat = new_row / ops.mean(new_row, axis=second, keepdims=True) * new_col
            u = g / ops.sqrt(v_hat)

        if self.clipping_threshold is not None:
            u = u / ops.maximum(1.0, _rms(u) / self.clipping_threshold)
        multiplier = self.lr_multiplier(variable.shape)
        step = lr * u if multiplier == 1.0 else (lr * multiplier) * u
        if self.multiply_by_parameter_scale:
            step = step * ops.maximum(_rms(p), self.epsilon2)
        if self.beta1:
            m = self._m[index]
            step = self.beta1 * m + (1.0 - self.beta1) * step
            self.assign(m, step)
        self.assign(variable, ops.cast(p - step, variable.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(
            beta1=self.beta1,
            decay_rate=self.decay_rate,
            step_offset=self.step_offset,
            factored=self.factored,
            min_dim_size_to_factor=self.min_dim_size_to_factor,
            clipping_threshold=self.clipping_threshold,
            epsilon1=self.epsilon1,
            epsilon2=self.epsilon2,
            multiply_by_parameter_scale=self.multiply_by_parameter_scale,
            small_size=self.small_size,
            small_lr_multiplier=self.small_lr_multiplier,
        )
        return config


def make_optimizer(train: TrainConfig, total_steps: int | None = None) -> keras.optimizers.Optimizer:
    """The optimizer a recipe's `train` section asks for, with its learning-rate schedule.

    `total_steps` defaults to `train.steps`; it is the schedule's T unless `learning_rate.max_steps`
    is set. The learning rate is `MeliadSchedule` times the optimizer's `base_lr`, as meliad's
    Trainer.learning_rate_schedule_fn multiplies the schedule by the optimizer config's learning_rate.

    - adafactor (`train.adafactor`, meliad's FlaxAdafactorConfig → flax.optim.Adafactor): `Adafactor`
      with base_lr 1.0, beta1 0.9 (null: no momentum) and decay_rate 0.8, flax's defaults otherwise;
      `min_scale` is flax's epsilon2 (1e-3), the floor of the parameter scale; parameters with fewer
      than `small_size` elements (0: none) have their learning rate multiplied by `small_lr_multiplier`
      (beyond meliad, for short runs: docs/long_range.md).
    - adam (`train.adam`, meliad's old AdamConfig → flax.optim.Adam): `keras.optimizers.Adam` with
      base_lr 0.05 (so with the default cosine schedule Adam peaks at 0.05·0.01 = 5e-4), beta1 0.9,
      beta2 0.98, epsilon 1e-8 (flax's) and weight_decay 0 (meliad's old default; head's 1e-4 must be
      asked for). Weight decay is decoupled, as flax's `new_param -= lr·weight_decay·param` (optax.adamw
      at head is the same): Keras scales every trainable variable by (1 − lr·weight_decay) before the
      Adam step, with the same scheduled lr, and flax likewise decays every parameter.
      Decision: Keras adds epsilon to √v before the bias correction of v, flax after it; the effective
      epsilon differs by the factor √(1 − beta2^(t+1)) (7·10⁻⁸ instead of 10⁻⁸ at the first step),
      which only matters for gradients of that size.
      Unlike Adafactor, Adam is not invariant to the loss scale, and meliad's loss is a sum over tokens
      (spec §10.3).
    """
    steps = train.steps if total_steps is None else total_steps
    if train.optimizer == "adafactor":
        cfg = train.adafactor
        schedule = MeliadSchedule(train.learning_rate, train.warmup, steps, base_lr=cfg.base_lr)
        return Adafactor(learning_rate=schedule, beta1=cfg.beta1, decay_rate=cfg.decay_rate,
                         epsilon2=cfg.min_scale, small_size=cfg.small_size,
                         small_lr_multiplier=cfg.small_lr_multiplier)
    if train.optimizer == "adam":
        cfg = train.adam
        schedule = MeliadSchedule(train.learning_rate, train.warmup, steps, base_lr=cfg.base_lr)
        return keras.optimizers.Adam(learning_rate=schedule, beta_1=cfg.beta1, beta_2=cfg.beta2,
                                     epsilon=ADAM_EPSILON, weight_decay=cfg.weight_decay or None)
    raise ValueError(f"train.optimizer: got {train.optimizer!r}, expected 'adafactor' or 'adam'")
