"""Built-in attention kernels: `reference`, the plain keras.ops path every fast kernel is tested against."""

from meliad_core.hookspecs import hookimpl
from meliad_core.plugins import LazyObject


@hookimpl
def meliad_register_attention_kernels(register):
    register("reference", LazyObject("meliad_attention.reference:ReferenceKernel"),
             description="einsum attention with meliad's safe softmax")
