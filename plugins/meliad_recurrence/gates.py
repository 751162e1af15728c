"""Gates of the recurrent state update (spec §8.4), as meliad computes them (not as the paper writes them)."""

from __future__ import annotations

import keras
from keras import ops

from meliad_core.layers.common import kernel_init


class FixedGate(keras.layers.Layer):
    """The paper's "fixed" gate (meliad's "bias"): g = σ(b), the same for every state and step."""

    def __init__(self, width: int, **kwargs):
        super().__init__(**kwargs)
        self.width = width

    def build(self, input_shape=None):
        self.bias = self.add_weight(shape=(self.width,), name="gate_bias",
                                    initializer=keras.initializers.RandomNormal(stddev=0.1))

    def call(self, state, update, hidden):
        g = ops.sigmoid(ops.cast(self.bias, state.dtype))
        return state * g + update * (1.0 - g)


class LSTMGate(keras.layers.Layer):
    """f = σ(W_f·h + b_f + 1), i = σ(W_i·h + b_i − 1); new = c·f + z·i, with h the MLP's hidden activation."""

    def __init__(self, width: int, hidden_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.width, self.hidden_dim = width, hidden_dim

    def build(self, input_shape=None):
        width, hidden_dim = self.width, self.hidden_dim
        bias_init = keras.initializers.RandomNormal(stddev=0.1)
        self.w_input = self.add_weight(shape=(hidden_dim, width), initializer=kernel_init(0.1), name="input_gate")
        self.b_input = self.add_weight(shape=(width,), initializer=bias_init, name="input_gate_bias")
        self.w_forget = self.add_weight(shape=(hidden_dim, width), initializer=kernel_init(0.1), name="forget_gate")
        self.b_forget = self.add_weight(shape=(width,), initializer=bias_init, name="forget_gate_bias")

    def call(self, state, update, hidden):
        forget = ops.sigmoid(ops.matmul(hidden, self.w_forget) + self.b_forget + 1.0)
        inp = ops.sigmoid(ops.matmul(hidden, self.w_input) + self.b_input - 1.0)
        return state * forget + update * inp
