"""T5 relative position bias as meliad uses it (spec §2): unidirectional, one (H, buckets) table per layer."""

from __future__ import annotations

import functools

import keras
import numpy as np
from keras import ops

from meliad_core.extend import PositionStrategy, relative_positions


def relative_position_bucket(rel: np.ndarray, bidirectional: bool = False, num_buckets: int = 32,
                             max_distance: int = 128) -> np.ndarray:
    """Maps relative positions (key − query) to buckets; computed with numpy at trace time (spec §2.2)."""
    n = -np.asarray(rel, dtype=np.int32)
    if bidirectional:
        num_buckets //= 2
        ret = (n < 0).astype(np.int32) * num_buckets
        n = np.abs(n)
    else:
        ret = np.zeros_like(n)
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    eps = np.finfo(np.float32).eps
    with np.errstate(divide="ignore"):
        large = max_exact + (
            np.log(n.astype(np.float32) / max_exact + eps) / np.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).astype(np.int32)
    large = np.minimum(large, num_buckets - 1)
    return ret + np.where(n < max_exact, n, large)


@functools.lru_cache(maxsize=64)
def _buckets(num_queries: int, num_keys: int, offset: int | None, num_buckets: int, max_distance: int) -> np.ndarray:
    """The (Q, K) bucket table of one geometry; cached so eager backends do not rebuild it every step."""
    buckets = relative_position_bucket(relative_positions(num_queries, num_keys, offset),
                                       num_buckets=num_buckets, max_distance=max_distance)
    buckets.flags.writeable = False
    return buckets


class T5RelativeBias(PositionStrategy):
    """Returns bias[h, i, j] = table[h, bucket(j − (i + offset))], shape (H, Q, K)."""

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance

    def build(self, input_shape=None):
        # flax default_embed_init on an (H, buckets) array: untruncated normal, std 1/sqrt(buckets) (spec §2.3)
        self.table = self.add_weight(
            shape=(self.num_heads, self.num_buckets),
            initializer=keras.initializers.RandomNormal(stddev=1.0 / np.sqrt(self.num_buckets)),
            name="rel_embedding",
        )
        self.built = True

    def compute_bias(self, num_queries: int, num_keys: int, offset: int | None = None):
        buckets = _buckets(num_queries, num_keys, offset, self.num_buckets, self.max_distance)
        return ops.take(self.table, ops.convert_to_tensor(buckets), axis=1)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "num_buckets": self.num_buckets,
                "max_distance": self.max_distance}
