"""Built-in recurrence gates: `fixed` (meliad's "bias" gate) and `lstm`."""

from meliad_core.hookspecs import hookimpl


def make_fixed_gate(width: int, hidden_dim: int, name: str):
    from meliad_recurrence.gates import FixedGate  # imports Keras: only when a model is built

    return FixedGate(width, name=name)


def make_lstm_gate(width: int, hidden_dim: int, name: str):
    from meliad_recurrence.gates import LSTMGate

    return LSTMGate(width, hidden_dim, name=name)


@hookimpl
def meliad_register_recurrence_gates(register):
    register("fixed", make_fixed_gate, description="new = c·σ(b) + z·(1−σ(b)), b learned per channel")
    register("lstm", make_lstm_gate, description="new = c·σ(W_f h + b_f + 1) + z·σ(W_i h + b_i − 1)")
