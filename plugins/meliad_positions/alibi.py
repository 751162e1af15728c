"""ALiBi (Press, Smith & Lewis, "Train Short, Test Long", ICLR 2022), with meliad head's sign convention.

Head h = 1 … H has the slope m_h = 2^(−8h/H) and the fixed bias

    bias[h, i, j] = −m_h · |j − (i + offset)|

(meliad head, `position_alibi.BoundedALiBi`, takes |relative position|, so the bias is symmetric; the causal
mask removes the future keys anyway.) By default nothing is learned. With `bounded`, this is meliad
head's BoundedALiBi: a learned scalar s (init 1) multiplies the slopes and a lower bound b clamps the bias,
bias = max(|s|·(−m_h·d), −|b|), with b learned (init `bound`, one per layer or one per head) or fixed.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
from keras import ops

from meliad_core.extend import PositionStrategy, relative_positions


def alibi_slopes(num_heads: int) -> np.ndarray:
    """(H,) float32: m_h = 2^(−8h/H) for h = 1 … H (the paper's geometric sequence)."""
    heads = np.arange(1, num_heads + 1, dtype=np.float64)
    return (2.0 ** (-8.0 * heads / num_heads)).astype(np.float32)


@functools.lru_cache(maxsize=64)
def alibi_table(num_queries: int, num_keys: int, offset: int | None, num_heads: int) -> np.ndarray:
    """(H, Q, K) float32: −m_h·|j − (i + offset)|; read-only, cached per geometry."""
    distance = np.abs(relative_positions(num_queries, num_keys, offset)).astype(np.float32)
    table = -alibi_slopes(num_heads)[:, None, None] * distance[None]
    table.flags.writeable = False
    return table


class ALiBiBias(PositionStrategy):
    """compute_bias(Q, K, offset) -> (H, Q, K); no weights unless `bounded`."""

    def __init__(self, num_heads: int, bounded: bool = False, bound: float = 1.0, learn_bound: bool = True,
                 per_head_bound: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.bounded = bool(bounded)
        self.bound = float(bound)
        self.learn_bound = bool(learn_bound)
        self.per_head_bound = bool(per_head_bound)

    def build(self, input_shape=None):
        if self.bounded:
            self.scale = self.add_weight(shape=(), initializer="ones", name="scale")
            if self.learn_bound:
                self.bound_weight = self.add_weight(
                    shape=(self.num_heads if self.per_head_bound else 1,),
                    initializer=keras.initializers.Constant(self.bound), name="bound")
        self.built = True

    def compute_bias(self, num_queries: int, num_keys: int, offset: int | None = None):
        bias = ops.convert_to_tensor(alibi_table(num_queries, num_keys, offset, self.num_heads))
        if not self.bounded:
            return bias
        bias = bias * ops.abs(ops.cast(self.scale, bias.dtype))
        if self.learn_bound:
            bound = ops.reshape(ops.cast(self.bound_weight, bias.dtype), (-1, 1, 1))
        else:
            bound = ops.convert_to_tensor(np.float32(self.bound))
        return ops.maximum(bias, -ops.abs(bound))

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "bounded": self.bounded, "bound": self.bound,
                "learn_bound": self.learn_bound, "per_head_bound": self.per_head_bound}
