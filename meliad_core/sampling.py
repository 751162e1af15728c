"""What a generation sampler works with (numpy only; no Keras): the contract and filtering helpers.

A sampler plugin registers an object with `sample(logits, rng) -> ids` through the
`meliad_register_samplers` hook (see `meliad_core.hookspecs`); the built-ins (`greedy`,
`temperature`, `top_k`, `top_p`) live in `plugins/meliad_samplers`. Everything here is exported by
`meliad_core.extend`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Sampler(Protocol):
    """`sample(logits (B, V) float32 numpy, rng numpy.random.Generator) -> (B,) int ids`.

    Banned ids arrive as −inf logits. Use only `rng` for randomness, so that a seed reproduces a
    generation. A sampler with declared options gets them through `configure(options)`.
    """

    def sample(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities (float64) of logits / temperature over the last axis; −inf logits get 0."""
    x = np.asarray(logits, dtype=np.float64) / float(temperature)
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Logits with all but the k largest of each row set to −inf (ties at the k-th value are kept)."""
    logits = np.asarray(logits, dtype=np.float32)
    k = min(int(k), logits.shape[-1])
    kth = np.partition(logits, -k, axis=-1)[..., -k][..., None]
    return np.where(logits >= kth, logits, -np.inf).astype(np.float32)


def top_p_filter(logits: np.ndarray, p: float, temperature: float = 1.0) -> np.ndarray:
    """Nucleus filtering: keeps each row's smallest set of most likely ids whose probability (at
    `temperature`) reaches p (at least one id); the others become −inf."""
    logits = np.asarray(logits, dtype=np.float32)
    probs = softmax(logits, temperature)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the ids ranked above
    keep_sorted = before < float(p)
    keep_sorted[..., 0] = True
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return np.where(keep, logits, -np.inf).astype(np.float32)


def categorical(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0) -> np.ndarray:
    """One id per row drawn from softmax(logits / temperature) with `rng` (inverse-CDF, one uniform per row)."""
    probs = softmax(logits, temperature)
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random((probs.shape[0], 1)) * cdf[:, -1:]
    ids = np.sum(cdf <= u, axis=-1)
    return np.minimum(ids, probs.shape[-1] - 1).astype(np.int64)
