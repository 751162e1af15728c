"""Built-in recurrence gates (spec §8.4): `fixed` (meliad's "bias"), `lstm`, `full` and `residual`.

Each factory `make_gate(width, hidden_dim, name)` returns a Keras layer whose `call(state, update,
hidden)` returns the new state. The layers, and Keras with them, are imported inside the factories.
"""

from meliad_core.extend import hookimpl


def make_fixed_gate(width: int, hidden_dim: int, name: str):
    from meliad_recurrence.gates import FixedGate  # imports Keras: only when a model is built

    return FixedGate(width, name=name)


def make_lstm_gate(width: int, hidden_dim: int, name: str):
    from meliad_recurrence.gates import LSTMGate

    return LSTMGate(width, hidden_dim, name=name)


def make_full_gate(width: int, hidden_dim: int, name: str):
    from meliad_recurrence.gates import FullGate

    return FullGate(width, hidden_dim, name=name)


def make_residual_gate(width: int, hidden_dim: int, name: str):
    from meliad_recurrence.gates import ResidualGate

    return ResidualGate(width, hidden_dim, name=name)


@hookimpl
def meliad_register_recurrence_gates(register):
    register("fixed", make_fixed_gate, description="new = c·σ(b) + z·(1−σ(b)), b learned per channel")
    register("lstm", make_lstm_gate, description="new = c·σ(W_f h + b_f + 1) + z·σ(W_i h + b_i − 1)")
    register("full", make_full_gate, description="GRU-style: g = σ(W h + b + 1), new = c·g + z·(1−g)")
    register("residual", make_residual_gate, description="new = c + z (no gate, no weights)")
