"""PyTorch kernels for meliad: `torch_sdpa`, attention through torch's scaled_dot_product_attention.

Registered for the torch Keras backend only; torch is imported on first use, so listing plugins
under another backend (where torch may not be installed) imports nothing.
"""

from __future__ import annotations

import importlib.util

from meliad_core.extend import LazyObject, hookimpl


def _available() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed (pip install 'meliad[torch]')"
    return None


@hookimpl
def meliad_register_attention_kernels(register):
    register("torch_sdpa", LazyObject("meliad_torch.sdpa:TorchSDPAKernel"), backends=("torch",), available=_available,
             description="torch scaled_dot_product_attention fed meliad's bias, scale and mask")
