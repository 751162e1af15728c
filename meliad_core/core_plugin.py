"""What core registers itself, so that no plugin can be disabled into a broken model: `reference`,
the portable attention kernel every model can run on and every fast kernel is tested against."""

from meliad_core.hookspecs import hookimpl
from meliad_core.plugins import LazyObject

CORE_PLUGIN = "core"  # its name in the plugin manager; MELIAD_DISABLE_PLUGINS does not apply to it


@hookimpl
def meliad_register_attention_kernels(register):
    register("reference", LazyObject("meliad_core.layers.attention:ReferenceKernel"),
             description="einsum attention with meliad's safe softmax (core)")
