"""JAX-only strategies for meliad: the `jax_dpa` attention kernel (`jax.nn.dot_product_attention`) and
the `jax_approx` memory store (`jax.lax.approx_max_k`, TPU-native approximate top-k).

Registered for the jax Keras backend only; jax is imported on first use, so listing plugins under
another backend (where jax may not be installed) imports nothing.
"""

from __future__ import annotations

import importlib.util
import os

from meliad_core.extend import LazyObject, Option, hookimpl

RECALL_TARGET = 0.95  # jax.lax.approx_max_k's own default


def _jax_missing() -> str | None:
    if importlib.util.find_spec("jax") is None:
        return "JAX is not installed (pip install 'meliad[jax]')"
    return None


def _available() -> str | None:
    missing = _jax_missing()
    if missing:
        return missing
    if os.environ.get("MELIAD_JAX_DPA_ON_CPU", "") in ("", "0"):
        import jax

        if jax.default_backend() == "cpu":
            # measured (benchmarks/kernels.py): no faster than XLA's reference path on CPU, so `auto`
            # keeps `reference` there; MELIAD_JAX_DPA_ON_CPU=1 makes it available anyway
            return "no gain over the XLA reference path on CPU (set MELIAD_JAX_DPA_ON_CPU=1 to use it there)"
    return None


@hookimpl
def meliad_register_attention_kernels(register):
    register("jax_dpa", LazyObject("meliad_jax.attention:JaxDotProductAttention"), backends=("jax",),
             available=_available,
             description="jax.nn.dot_product_attention (cuDNN on GPU, XLA elsewhere) fed meliad's bias, scale, mask")


@hookimpl
def meliad_register_memory_stores(register):
    register("jax_approx", LazyObject("meliad_jax.approx_store:ApproxMaxKStore"), backends=("jax",),
             available=_jax_missing,
             description="jax.lax.approx_max_k over the filled slots (approximate on TPU, exact top-k on CPU/GPU)",
             options={"recall_target": Option(float, RECALL_TARGET, "expected recall of the true top k on TPU "
                                              "(CPU and GPU run exact top-k)", minimum=0.01, maximum=1.0)})
