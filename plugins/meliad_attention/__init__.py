"""Built-in attention kernels: `reference`, the plain keras.ops path every fast kernel is tested against."""

from meliad_core.hookspecs import hookimpl
from meliad_core.layers.attention import reference_attend


class ReferenceKernel:
    """meliad's attention computed with einsums; runs on every backend."""

    name = "reference"

    def attend(self, q, k, v, *, bias=None, mask=None, scale=None, dropout_mask=None):
        return reference_attend(q, k, v, bias=bias, mask=mask, scale=scale, dropout_mask=dropout_mask)


@hookimpl
def meliad_register_attention_kernels(register):
    register("reference", ReferenceKernel(), description="einsum attention with meliad's safe softmax")
