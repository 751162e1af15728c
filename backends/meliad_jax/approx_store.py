"""The `jax_approx` memory store: approximate top-k with `jax.lax.approx_max_k`, on the device.

A device store (the memory is the model's variables, as for `exact`): it is `exact` with the top-k
replaced. Each chunk of queries is scored against every slot, unfilled slots are pushed to the bottom,
and `approx_max_k` picks k slots per query. On TPU that is the partial-reduction top-k (each query keeps
the best slot of each of L groups, then the top k of those), whose expected recall of the true top k is
`recall_target`; on CPU and GPU XLA lowers it to its exact fallback (`is_fallback`), so there the picks
equal `exact`'s up to ties. Picked slots are gathered once, and a pick that is not a filled slot (fewer
filled slots than k) becomes zeros, as in `exact`.
"""

from __future__ import annotations

import jax

from meliad_jax import RECALL_TARGET
from meliad_memory.stores import ExactStore


class ApproxMaxKStore(ExactStore):
    """k approximate best-scoring filled slots per query (`jax.lax.approx_max_k`); missing neighbours are zeros."""

    def __init__(self, recall_target: float = RECALL_TARGET):
        self.recall_target = float(recall_target)

    def configure(self, options: dict) -> "ApproxMaxKStore":
        return ApproxMaxKStore(**options)

    def pick(self, scores, k: int):
        return jax.lax.approx_max_k(scores, k, recall_target=self.recall_target)[1]
