"""Built-in recurrence gates (spec §8.4): `fixed` (meliad's "bias"), `lstm`, `full` and `residual`.

Each factory `make_gate(width, hidden_dim, name)` returns a Keras layer whose `call(state, update,
hidden)` returns the new state. The layers, and Keras with them, are imported inside the factories.
The gated ones take `recurrence.options.bias_init` (beyond meliad, default 0 = meliad's initialisation).
"""

from __future__ import annotations

from meliad_core.extend import Option, hookimpl

BIAS_INIT = Option(float, 0.0, "beyond meliad: mean of the initial bias of the gate that keeps the old state "
                   "(fixed: b, lstm: b_f, full: b; meliad: 0); 2 keeps σ(2) = 88 % (fixed) at the start",
                   minimum=-20.0, maximum=20.0)
OPTIONS = {"bias_init": BIAS_INIT}


class GateFactory:
    """`make_gate(width, hidden_dim, name)`; `configure(options)` returns one with the options bound."""

    def __init__(self, layer: str, bias_init: float = 0.0):
        self.layer, self.bias_init = layer, bias_init

    def configure(self, options: dict) -> GateFactory:
        return GateFactory(self.layer, options["bias_init"])

    def __call__(self, width: int, hidden_dim: int, name: str):
        from meliad_recurrence import gates  # imports Keras: only when a model is built

        if self.layer == "FixedGate":
            return gates.FixedGate(width, bias_init=self.bias_init, name=name)
        return getattr(gates, self.layer)(width, hidden_dim, bias_init=self.bias_init, name=name)


make_fixed_gate = GateFactory("FixedGate")  # meliad's initialisation (bias_init 0)
make_lstm_gate = GateFactory("LSTMGate")
make_full_gate = GateFactory("FullGate")


def make_residual_gate(width: int, hidden_dim: int, name: str):
    from meliad_recurrence.gates import ResidualGate

    return ResidualGate(width, hidden_dim, name=name)


@hookimpl
def meliad_register_recurrence_gates(register):
    register("fixed", make_fixed_gate, options=OPTIONS,
             description="new = c·σ(b) + z·(1−σ(b)), b learned per channel")
    register("lstm", make_lstm_gate, options=OPTIONS,
             description="new = c·σ(W_f h + b_f + 1) + z·σ(W_i h + b_i − 1)")
    register("full", make_full_gate, options=OPTIONS,
             description="GRU-style: g = σ(W h + b + 1), new = c·g + z·(1−g)")
    register("residual", make_residual_gate, description="new = c + z (no gate, no weights)")
