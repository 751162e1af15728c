"""TensorFlow kernels for meliad: `tf_xla`, meliad's attention as one XLA-compiled function.

Registered for the tensorflow Keras backend only; TensorFlow is imported on first use, so listing
plugins under another backend (where TensorFlow may not be installed) imports nothing.
"""

from __future__ import annotations

import importlib.util
import os

from meliad_core.extend import LazyObject, hookimpl


def _available() -> str | None:
    if importlib.util.find_spec("tensorflow") is None:
        return "TensorFlow is not installed (pip install 'meliad[tensorflow]')"
    if os.environ.get("MELIAD_TF_XLA_ON_CPU", "") in ("", "0"):
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            # measured (benchmarks/kernels.py): slower than TF's reference path on CPU, so `auto` keeps
            # `reference` there; MELIAD_TF_XLA_ON_CPU=1 makes it available anyway
            return "slower than the reference path on CPU (set MELIAD_TF_XLA_ON_CPU=1 to use it there)"
    return None


@hookimpl
def meliad_register_attention_kernels(register):
    register("tf_xla", LazyObject("meliad_tensorflow.attention:TFXLAAttention"), backends=("tensorflow",),
             available=_available,
             description="meliad's attention fused by XLA (tf.function(jit_compile=True)), dropout mask included")
