"""The reference attention kernel: meliad's attention computed with einsums, on every backend."""

from meliad_core.layers.attention import reference_attend


class ReferenceKernel:
    name = "reference"

    def attend(self, q, k, v, *, bias=None, mask=None, scale=None, dropout_mask=None):
        return reference_attend(q, k, v, bias=bias, mask=mask, scale=scale, dropout_mask=dropout_mask)
