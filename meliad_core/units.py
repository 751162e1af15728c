"""Constants and message helpers that several modules share (no Keras import)."""

from __future__ import annotations

import math

LOG2E = 1.0 / math.log(2.0)  # nats -> bits


def one_line(message: object) -> str:
    """Any message (an exception or text) folded onto one line, for users and logs."""
    if isinstance(message, BaseException):
        text = f"{type(message).__name__}: {message}".strip()
        message = text if str(message) else type(message).__name__
    return " ".join(str(message).split())
