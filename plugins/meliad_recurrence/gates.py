"""Gates of the recurrent state update (spec §8.4), as meliad computes them (`MLP._gate`), not as the
paper writes them. `state` is c, `update` the MLP output z and `hidden` the MLP's last hidden activation.

Weights as meliad initialises them: gate kernels variance_scaling(0.1, fan_in, truncated normal), gate
biases N(0, 0.1). Beyond meliad, `bias_init` moves the mean of the bias that decides how much of the old
state is kept (fixed: b; lstm: b_f; full: b), so that a state can start out remembering
(docs/long_range.md, experiment 19).
"""

from __future__ import annotations

import keras
from keras import ops

from meliad_core.extend import kernel_init


def _gate_bias_init(mean: float = 0.0):
    return keras.initializers.RandomNormal(mean=mean, stddev=0.1)


class FixedGate(keras.layers.Layer):
    """The paper's "fixed" gate (meliad's "bias"): g = σ(b), the same for every state and step."""

    def __init__(self, width: int, bias_init: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.width, self.bias_init = width, bias_init

    def build(self, input_shape=None):
        self.bias = self.add_weight(shape=(self.width,), name="gate_bias",
                                    initializer=_gate_bias_init(self.bias_init))
        self.built = True

    def call(self, state, update, hidden):
        g = ops.sigmoid(ops.cast(self.bias, state.dtype))
        return state * g + update * (1.0 - g)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "bias_init": self.bias_init}


class LSTMGate(keras.layers.Layer):
    """f = σ(W_f·h + b_f + 1), i = σ(W_i·h + b_i − 1); new = c·f + z·i, with h the MLP's hidden activation."""

    def __init__(self, width: int, hidden_dim: int, bias_init: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.width, self.hidden_dim, self.bias_init = width, hidden_dim, bias_init

    def build(self, input_shape=None):
        width, hidden_dim = self.width, self.hidden_dim
        self.w_input = self.add_weight(shape=(hidden_dim, width), initializer=kernel_init(0.1), name="input_gate")
        self.b_input = self.add_weight(shape=(width,), initializer=_gate_bias_init(), name="input_gate_bias")
        self.w_forget = self.add_weight(shape=(hidden_dim, width), initializer=kernel_init(0.1), name="forget_gate")
        self.b_forget = self.add_weight(shape=(width,), initializer=_gate_bias_init(self.bias_init),
                                        name="forget_gate_bias")
        self.built = True

    def call(self, state, update, hidden):
        forget = ops.sigmoid(ops.matmul(hidden, self.w_forget) + self.b_forget + 1.0)
        inp = ops.sigmoid(ops.matmul(hidden, self.w_input) + self.b_input - 1.0)
        return state * forget + update * inp

    def get_config(self):
        return {**super().get_config(), "width": self.width, "hidden_dim": self.hidden_dim,
                "bias_init": self.bias_init}


class FullGate(keras.layers.Layer):
    """meliad's "full" (GRU-style) gate: g = σ(W·h + b + 1), biased to remember; new = c·g + z·(1−g)."""

    def __init__(self, width: int, hidden_dim: int, bias_init: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.width, self.hidden_dim, self.bias_init = width, hidden_dim, bias_init

    def build(self, input_shape=None):
        self.w_gate = self.add_weight(shape=(self.hidden_dim, self.width), initializer=kernel_init(0.1),
                                      name="gate")
        self.b_gate = self.add_weight(shape=(self.width,), initializer=_gate_bias_init(self.bias_init),
                                      name="gate_bias")
        self.built = True

    def call(self, state, update, hidden):
        g = ops.sigmoid(ops.matmul(hidden, self.w_gate) + self.b_gate + 1.0)
        return state * g + update * (1.0 - g)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "hidden_dim": self.hidden_dim,
                "bias_init": self.bias_init}


class ResidualGate(keras.layers.Layer):
    """meliad's "residual" gate: new = c + z. No weights; `width` and `hidden_dim` are kept for the config."""

    def __init__(self, width: int, hidden_dim: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.width, self.hidden_dim = width, hidden_dim

    def build(self, input_shape=None):
        self.built = True

    def call(self, state, update, hidden):
        return state + update

    def get_config(self):
        return {**super().get_config(), "width": self.width, "hidden_dim": self.hidden_dim}
