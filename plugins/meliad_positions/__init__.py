"""Built-in position strategies: `t5` (meliad's default), `rotary`, `fourier`, `alibi` and `none`.

Each factory `make_position(*, num_heads, head_dim, window, options, name)` returns a
`PositionStrategy` layer (or None). Registering imports nothing heavy: the layers, and Keras with
them, are imported inside the factories, when a model is built.
"""

from __future__ import annotations

from meliad_core.extend import Option, RecipeError, hookimpl

PREFIX = "model.position_options"

T5_OPTIONS = {
    "num_buckets": Option(int, 32, "number of relative-position buckets (meliad hard-codes 32)", minimum=2),
    "max_distance": Option(int, 128, "distance from which every key falls in the last bucket (meliad: 128)",
                           minimum=2),
}
ROTARY_OPTIONS = {
    "max_wavelength": Option(float, 10_000.0, "longest half-wavelength of the rotations, in tokens "
                             "(angle π·position/wavelength; meliad: 10000)", minimum=1.0),
}
FOURIER_OPTIONS = {
    "position_vector_size": Option(int, 128, "length of the sin/cos position vectors, even (meliad: 128)",
                                   minimum=2),
    "max_wavelength": Option(float, 0.0, "longest half-wavelength, in tokens; 0 means 2·window, "
                             "as meliad's layer sets it", minimum=0.0),
}
ALIBI_OPTIONS = {
    "bounded": Option(bool, False, "meliad head's BoundedALiBi: a learned scale on the slopes and a lower "
                      "bound on the bias (false: the paper's fixed ALiBi)"),
    "bound": Option(float, 1.0, "with bounded: the lower bound −|bound| (its initial value when learned; "
                    "meliad head: 1.0, or 2.0 in positions_alibi_fixed_bound.gin)", minimum=0.0),
    "learn_bound": Option(bool, True, "with bounded: learn the bound (false: fixed at `bound`)"),
    "per_head_bound": Option(bool, False, "with bounded and learn_bound: one bound per head, not per layer"),
}


def _filled(declared: dict, options: dict | None) -> dict:
    """The options with the declared defaults for those not given (the core passes them all)."""
    return {**{key: option.default for key, option in declared.items()}, **(options or {})}


def _fail(key: str, value, expected: str):
    raise RecipeError(f"{PREFIX}.{key}: got {value!r}, expected {expected}")


def make_t5_bias(*, num_heads: int, head_dim: int, window: int, options: dict | None = None, name: str):
    from meliad_positions.t5 import T5RelativeBias  # imports Keras: only when a model is built

    opts = _filled(T5_OPTIONS, options)
    if opts["max_distance"] <= opts["num_buckets"] // 2:
        _fail("max_distance", opts["max_distance"], f"more than num_buckets // 2 = {opts['num_buckets'] // 2}")
    return T5RelativeBias(num_heads=num_heads, num_buckets=opts["num_buckets"], max_distance=opts["max_distance"],
                          name=name)


def make_rotary(*, num_heads: int, head_dim: int, window: int, options: dict | None = None, name: str):
    from meliad_positions.rotary import RotaryPositions

    opts = _filled(ROTARY_OPTIONS, options)
    if head_dim % 2:
        raise RecipeError(f"model.head_dim: got {head_dim}, expected an even number for position_bias rotary")
    if not opts["max_wavelength"] > 1:
        _fail("max_wavelength", opts["max_wavelength"], "a number > 1")
    return RotaryPositions(max_wavelength=opts["max_wavelength"], name=name)


def make_fourier(*, num_heads: int, head_dim: int, window: int, options: dict | None = None, name: str):
    from meliad_positions.fourier import FourierRelativeBias

    opts = _filled(FOURIER_OPTIONS, options)
    size = opts["position_vector_size"]
    if size % 2:
        _fail("position_vector_size", size, "an even integer")
    max_wavelength = opts["max_wavelength"] or 2.0 * window
    if not max_wavelength > 1:
        _fail("max_wavelength", opts["max_wavelength"], "0 (2·window) or a number > 1")
    return FourierRelativeBias(num_heads=num_heads, position_vector_size=size, max_wavelength=max_wavelength,
                               name=name)


def make_alibi(*, num_heads: int, head_dim: int, window: int, options: dict | None = None, name: str):
    from meliad_positions.alibi import ALiBiBias

    opts = _filled(ALIBI_OPTIONS, options)
    return ALiBiBias(num_heads=num_heads, bounded=opts["bounded"], bound=opts["bound"],
                     learn_bound=opts["learn_bound"], per_head_bound=opts["per_head_bound"], name=name)


def make_no_bias(*, num_heads: int, head_dim: int, window: int, options: dict | None = None, name: str):
    return None


@hookimpl
def meliad_register_position_biases(register):
    register("t5", make_t5_bias, options=T5_OPTIONS,
             description="T5 relative position bias, unidirectional, one learned (heads, buckets) table per layer")
    register("rotary", make_rotary, options=ROTARY_OPTIONS,
             description="rotary embeddings (RoPE) of queries and keys, meliad's angle π·pos/wavelength; no weights")
    register("fourier", make_fourier, options=FOURIER_OPTIONS,
             description="meliad's Fourier relative bias: learned 2x2 rotations of sin/cos query positions")
    register("alibi", make_alibi, options=ALIBI_OPTIONS,
             description="ALiBi: fixed bias −2^(−8h/H)·distance per head (bounded: meliad head's learned variant)")
    register("none", make_no_bias, description="no position information in attention")
