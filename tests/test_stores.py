"""The memory stores against meliad's formulas (spec §7.3), computed here in numpy.

`bucketed` picks each bucket's winner with an argmax and gathers it; meliad takes softmax(scores·1e6)
over the bucket and a weighted sum. They agree except on exact ties between written slots, where
meliad averages and the argmax returns one of the tied slots (tested below).
"""

from __future__ import annotations

import numpy as np
import pytest

from meliad_memory.stores import BucketedStore, ExactStore
from model_helpers import to_numpy


def meliad_bucketed(key_db, value_db, queries, k):
    """spec §7.3 verbatim, in float64: softmax_j(scores·1e6) over each strided bucket, weighted sums."""
    b, h, m, d = key_db.shape
    scores = np.einsum("bhnd,bhmd->bhnm", queries.astype(np.float64), key_db.astype(np.float64))
    scores = scores + np.where(key_db.sum(-1) == 0, -1e6, 0.0)[:, :, None, :]
    scores = scores.reshape(b, h, -1, m // k, k) * 1e6
    w = np.exp(scores - scores.max(axis=3, keepdims=True))
    w = w / w.sum(axis=3, keepdims=True)
    kb, vb = key_db.reshape(b, h, m // k, k, d), value_db.reshape(b, h, m // k, k, d)
    return np.einsum("bhnjk,bhjkd->bhnkd", w, kb), np.einsum("bhnjk,bhjkd->bhnkd", w, vb)


def _memory(rng, b=2, h=3, m=32, d=8, n=6, written=None):
    key_db = rng.normal(size=(b, h, m, d)).astype("float32")
    value_db = rng.normal(size=(b, h, m, d)).astype("float32")
    written = [m] * b if written is None else written
    for row, count in enumerate(written):  # unwritten slots are zeros, as after a reset
        key_db[row, :, count:] = 0.0
        value_db[row, :, count:] = 0.0
    filled = np.arange(m)[None, :] < np.array(written)[:, None]
    queries = rng.normal(size=(b, h, n, d)).astype("float32")
    return key_db, value_db, filled, queries


@pytest.mark.parametrize("query_chunk", [0, 1, 4])
def test_bucketed_equals_meliad_softmax_formula(query_chunk):
    rng = np.random.default_rng(0)
    # row 0 full; row 1 has 10 of 32 slots written: with k = 8, buckets 2..7 of row 1 hold one written slot,
    # and with 4 of 32 written (row 2 below) buckets 4..7 are entirely empty
    key_db, value_db, filled, queries = _memory(rng, b=3, written=[32, 10, 4], n=6)
    rk, rv = BucketedStore().retrieve(key_db, value_db, filled, queries, num_neighbors=8, query_chunk=query_chunk)
    ek, ev = meliad_bucketed(key_db, value_db, queries, 8)
    np.testing.assert_allclose(to_numpy(rk), ek, rtol=0, atol=1e-6)
    np.testing.assert_allclose(to_numpy(rv), ev, rtol=0, atol=1e-6)
    assert not to_numpy(rk)[2, :, :, 4:].any() and not to_numpy(rv)[2, :, :, 4:].any()  # empty buckets: zeros


def test_bucketed_all_empty_memory_gives_zeros():
    rng = np.random.default_rng(1)
    key_db, value_db, filled, queries = _memory(rng, written=[0, 0])
    rk, rv = BucketedStore().retrieve(key_db, value_db, filled, queries, num_neighbors=4, query_chunk=0)
    assert to_numpy(rk).shape == (2, 3, 6, 4, 8)
    assert not to_numpy(rk).any() and not to_numpy(rv).any()


def test_bucketed_exact_tie_returns_one_tied_slot_where_meliad_averages():
    rng = np.random.default_rng(2)
    key_db, value_db, filled, queries = _memory(rng, b=1, h=1, m=16, n=1, d=4)
    k = 4
    key_db[0, 0, 1 + 2 * k] = key_db[0, 0, 1] = [3.0, 3.0, 3.0, 3.0]  # bucket 1: slots 1 and 9 tie and win
    queries[:] = 1.0
    _, rv = BucketedStore().retrieve(key_db, value_db, filled, queries, num_neighbors=k, query_chunk=0)
    _, ev = meliad_bucketed(key_db, value_db, queries, k)
    got = to_numpy(rv)[0, 0, 0]
    np.testing.assert_allclose(ev[0, 0, 0, 1], (value_db[0, 0, 1] + value_db[0, 0, 9]) / 2, atol=1e-6)
    assert any(np.allclose(got[1], value_db[0, 0, s], atol=1e-6) for s in (1, 9))  # one of the tied slots
    np.testing.assert_allclose(np.delete(got, 1, axis=0), np.delete(ev[0, 0, 0], 1, axis=0), atol=1e-6)


def _exact_numpy(key_db, value_db, filled, queries, k):
    scores = np.einsum("bhnd,bhmd->bhnm", queries, key_db)
    scores = np.where(filled[:, None, None, :], scores, -np.inf)
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    keep = np.take_along_axis(np.broadcast_to(filled[:, None, None, :], scores.shape), order, axis=-1)
    gk = np.take_along_axis(key_db[:, :, None], order[..., None], axis=3) * keep[..., None]
    gv = np.take_along_axis(value_db[:, :, None], order[..., None], axis=3) * keep[..., None]
    return gk, gv


def _top_k_store(name: str):
    """`exact`, or `jax_approx` (backends/meliad_jax) off TPU, where approx_max_k's exact fallback runs."""
    if name == "exact":
        return ExactStore()
    import keras

    if keras.backend.backend() != "jax":
        pytest.skip("jax_approx serves the jax backend only")
    import jax

    if jax.default_backend() == "tpu":
        pytest.skip("approximate on TPU")
    from meliad_jax.approx_store import ApproxMaxKStore

    return ApproxMaxKStore()


@pytest.mark.parametrize("store", ["exact", "jax_approx"])
@pytest.mark.parametrize("query_chunk", [0, 2])
def test_top_k_stores_equal_numpy_top_k(store, query_chunk):
    rng = np.random.default_rng(3)
    key_db, value_db, filled, queries = _memory(rng, written=[32, 5])
    filled[0, ::3] = False  # any set of filled slots, not only a prefix
    rk, rv = _top_k_store(store).retrieve(key_db, value_db, filled, queries, num_neighbors=8, query_chunk=query_chunk)
    ek, ev = _exact_numpy(key_db, value_db, filled, queries, 8)
    np.testing.assert_allclose(to_numpy(rk), ek, atol=1e-6)
    np.testing.assert_allclose(to_numpy(rv), ev, atol=1e-6)
    assert np.count_nonzero(to_numpy(rv)[1].any(axis=-1)) == 3 * 6 * 5  # row 1: 5 neighbours, 3 zero rows
