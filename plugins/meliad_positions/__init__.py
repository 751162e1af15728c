"""Built-in position biases: `t5` (meliad's relative position bias) and `none`."""

from meliad_core.hookspecs import hookimpl


def make_t5_bias(num_heads: int, model_config, name: str):
    from meliad_positions.t5 import T5RelativeBias  # imports Keras: only when a model is built

    return T5RelativeBias(num_heads=num_heads, num_buckets=model_config.position_buckets,
                          max_distance=model_config.position_max_distance, name=name)


def make_no_bias(num_heads: int, model_config, name: str):
    return None


@hookimpl
def meliad_register_position_biases(register):
    register("t5", make_t5_bias, description="T5 relative position bias, unidirectional, per-layer table")
    register("none", make_no_bias, description="no position information in attention")
