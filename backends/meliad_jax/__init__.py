"""JAX kernels for meliad: `jax_dpa`, attention through `jax.nn.dot_product_attention`.

Registered for the jax Keras backend only; jax is imported on first use, so listing plugins under
another backend (where jax may not be installed) imports nothing.
"""

from __future__ import annotations

import importlib.util
import os

from meliad_core.extend import LazyObject, hookimpl


def _available() -> str | None:
    if importlib.util.find_spec("jax") is None:
        return "JAX is not installed (pip install 'meliad[jax]')"
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
