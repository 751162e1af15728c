"""Built-in generation samplers: `greedy`, `temperature`, `top_k` and `top_p` (numpy, on the host).

Registered through the `meliad_register_samplers` hook exactly as a third party's sampler would be.
All take the caller's seeded `numpy.random.Generator`, so a seed reproduces a generation.
"""

from __future__ import annotations

from meliad_core.extend import Option, hookimpl

TEMPERATURE = Option(float, 1.0, "divides the logits before sampling (lower: more conservative)", minimum=1e-6)
OPTIONS = {
    "temperature": {"temperature": TEMPERATURE},
    "top_k": {"k": Option(int, 40, "sample among the k most likely ids", minimum=1), "temperature": TEMPERATURE},
    "top_p": {"p": Option(float, 0.9, "sample among the most likely ids that hold this much probability",
                          minimum=1e-6, maximum=1.0), "temperature": TEMPERATURE},
}


@hookimpl
def meliad_register_samplers(register):
    from meliad_samplers.samplers import Greedy, Temperature, TopK, TopP

    register("greedy", Greedy(), description="the most likely id (ties: the lowest id); no randomness")
    register("temperature", Temperature(), options=OPTIONS["temperature"],
             description="sample from softmax(logits / temperature)")
    register("top_k", TopK(), options=OPTIONS["top_k"], description="sample among the k most likely ids")
    register("top_p", TopP(), options=OPTIONS["top_p"],
             description="nucleus sampling: among the most likely ids holding probability p")
