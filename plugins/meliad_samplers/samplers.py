"""The built-in samplers (numpy only): each `sample(logits (B, V), rng) -> (B,) ids`."""

from __future__ import annotations

import numpy as np

from meliad_core.extend import categorical, top_k_filter, top_p_filter


class Greedy:
    def sample(self, logits, rng):
        return np.argmax(np.asarray(logits), axis=-1)


class Temperature:
    def __init__(self, temperature: float = 1.0):
        self.temperature = float(temperature)

    def configure(self, options):
        return Temperature(options["temperature"])

    def sample(self, logits, rng):
        return categorical(logits, rng, self.temperature)


class TopK:
    def __init__(self, k: int = 40, temperature: float = 1.0):
        self.k, self.temperature = int(k), float(temperature)

    def configure(self, options):
        return TopK(options["k"], options["temperature"])

    def sample(self, logits, rng):
        return categorical(top_k_filter(logits, self.k), rng, self.temperature)


class TopP:
    def __init__(self, p: float = 0.9, temperature: float = 1.0):
        self.p, self.temperature = float(p), float(temperature)

    def configure(self, options):
        return TopP(options["p"], options["temperature"])

    def sample(self, logits, rng):
        return categorical(top_p_filter(logits, self.p, self.temperature), rng, self.temperature)
