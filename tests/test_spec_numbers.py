"""The numbers meliad_spec.md gives for the original: buckets, masks, safe softmax, memory buckets, sizes."""

from __future__ import annotations

import numpy as np
import pytest
from keras import ops

from meliad_core.layers.attention import relative_positions, safe_softmax, window_mask
from meliad_memory.stores import BucketedStore, ExactStore
from meliad_positions.t5 import relative_position_bucket
from model_helpers import make_model, to_numpy

# spec §2.2: bucket -> (first distance, last distance) for buckets 16..31 (0..15 are exact)
BUCKET_TABLE = {16: (16, 18), 17: (19, 20), 18: (21, 23), 19: (24, 26), 20: (27, 30), 21: (31, 34), 22: (35, 39),
                23: (40, 45), 24: (46, 51), 25: (52, 58), 26: (59, 66), 27: (67, 76), 28: (77, 86), 29: (87, 98),
                30: (99, 112), 31: (113, 5000)}


def test_t5_bucket_table_unidirectional():
    distances = np.arange(0, 5001)
    buckets = relative_position_bucket(-distances)  # rel = key − query: past keys are negative
    assert list(buckets[:16]) == list(range(16))
    for bucket, (first, last) in BUCKET_TABLE.items():
        assert set(buckets[first:last + 1]) == {bucket}, bucket
    assert relative_position_bucket(np.array([1, 5, 100])).tolist() == [0, 0, 0]  # future keys -> bucket 0


def test_t5_bucket_bidirectional_examples():
    rel = np.array([-5, 5, -20, 20, -200, 200])
    assert relative_position_bucket(rel, bidirectional=True).tolist() == [5, 21, 10, 26, 15, 31]


def test_window_mask_w4_worked_example():
    # spec §4.1: keys [p0 p1 p2 p3 | c0 c1 c2 c3]; c0 -> p0..p3, c1 -> p1,p2,p3,c0, ...
    mask = window_mask(4, 8, 4)
    expected = np.array([
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 0],
    ], bool)
    np.testing.assert_array_equal(mask, expected)
    distances = -relative_positions(4, 8)[mask].reshape(4, 4)
    np.testing.assert_array_equal(distances, [[4, 3, 2, 1]] * 4)


def test_no_cache_mask_excludes_self_and_token_zero_sees_nothing():
    mask = window_mask(4, 4, 4, offset=0)
    assert not mask.diagonal().any()
    assert not mask[0].any()
    assert mask[3].tolist() == [True, True, True, False]


def test_safe_softmax_masked_row_is_zero_and_other_rows_normal():
    x = np.array([[-1e6, -1e6, -1e6], [1.0, 2.0, 3.0]], "float32")
    p = to_numpy(safe_softmax(ops.convert_to_tensor(x)))
    np.testing.assert_allclose(p[0], 0.0, atol=1e-30)
    e = np.exp(x[1] - 3.0)
    np.testing.assert_allclose(p[1], e / e.sum(), rtol=1e-6)


def _toy_memory(scores):
    """A memory whose key i scores scores[i] against the query; value i carries the slot number i."""
    size = len(scores)
    keys = np.zeros((1, 1, size, size + 1), "float32")
    for i, s in enumerate(scores):
        keys[0, 0, i, i] = s
        keys[0, 0, i, size] = 1.0  # keeps every key's sum non-zero: all slots count as written
    values = np.tile(np.arange(size, dtype="float32")[None, None, :, None], (1, 1, 1, size + 1))
    query = np.zeros((1, 1, 1, size + 1), "float32")
    query[..., :size] = 1.0
    return keys, values, query


def test_bucketed_memory_toy_example_selects_spec_slots():
    keys, values, query = _toy_memory([0.1, 0.9, 0.3, 0.2, 0.5, 0.0, 0.7, 0.8])
    filled = np.ones((1, 8), bool)
    _, got = BucketedStore().retrieve(keys, values, filled, query, num_neighbors=4, query_chunk=0)
    assert to_numpy(got)[0, 0, 0, :, 0].tolist() == [4.0, 1.0, 6.0, 7.0]


def test_bucketed_memory_empty_returns_zeros_and_empty_slots_lose():
    keys, values, query = _toy_memory([0.1, 0.9, 0.3, 0.2, 0.5, 0.0, 0.7, 0.8])
    keys[0, 0, 4] = 0.0  # slot 4 now looks empty (key sum 0): slot 0 must win bucket 0 despite its lower score
    _, got = BucketedStore().retrieve(keys, values, np.ones((1, 8), bool), query, 4, 0)
    assert to_numpy(got)[0, 0, 0, :, 0].tolist() == [0.0, 1.0, 6.0, 7.0]
    zeros = np.zeros_like(keys)
    rk, rv = BucketedStore().retrieve(zeros, values * 0, np.zeros((1, 8), bool), query, 4, 0)
    assert not to_numpy(rk).any() and not to_numpy(rv).any()


def test_exact_memory_returns_true_top_k_of_filled_slots():
    keys, values, query = _toy_memory([0.1, 0.9, 0.3, 0.2, 0.5, 0.0, 0.7, 0.8])
    filled = np.array([[True] * 7 + [False]])  # slot 7 unwritten
    _, got = ExactStore().retrieve(keys, values, filled, query, num_neighbors=4, query_chunk=0)
    assert sorted(to_numpy(got)[0, 0, 0, :, 0].tolist()) == [1.0, 2.0, 4.0, 6.0]
    filled = np.array([[True, True] + [False] * 6])  # fewer filled slots than neighbours: the rest are zeros
    rk, got = ExactStore().retrieve(keys, values, filled, query, num_neighbors=4, query_chunk=0)
    assert sorted(to_numpy(got)[0, 0, 0, :, 0].tolist()) == [0.0, 0.0, 0.0, 1.0]
    assert np.count_nonzero(to_numpy(rk)[0, 0, 0].any(axis=-1)) == 2


MEDIUM = dict(num_layers=12, embed_dim=1024, num_heads=8, head_dim=128, mlp_dim=4096, vocab_size=8)


def _medium(num_layers: int, **sections):
    recipe = {"model": {**MEDIUM, "num_layers": num_layers}, "attention": {"window": 8},
              "data": {"segment_length": 8, "batch_size": 1}}
    recipe.update(sections)
    return make_model(recipe, streams=("train",))


def test_medium_150m_has_151_02m_non_embedding_parameters():
    count = _medium(12).non_embedding_parameter_count()
    per_layer = 3 * 1024 * 1024 + 1024 * 1024 + 2 * 1024 * 4096 + 2 * 1024 + 8 + 8 * 32
    assert count == 12 * per_layer + 1024
    assert round(count / 1e6, 2) == 151.02


@pytest.mark.parametrize("variant,expected_millions", [("skip", 9.4), ("dual", 9.4 + 8.4)])
def test_recurrent_layer_overhead(variant, expected_millions):
    base = _medium(1).non_embedding_parameter_count()
    rec = {"layers": [0], "num_states": 512, "gate": "fixed", "variant": variant}
    overhead = _medium(1, recurrence=rec).non_embedding_parameter_count() - base
    e, hd = 1024, 1024
    skip = (hd * e  # Wq2 on the token side
            + hd * e + 8  # the second half of Wo, attention_scale2
            + e + 2 * 512 * e + 4 * e * hd + 2 * 8  # state norm, initial state, state IDs, K/V/Q/Q2, scales
            + 2 * hd * e + e)  # state Wo and the fixed gate's bias
    expected = skip if variant == "skip" else skip + e + 2 * e * 4096 + e  # + state FFN, its norm and gate
    assert overhead == expected
    assert round(overhead / 1e6, 1) == pytest.approx(expected_millions, abs=0.05)


def test_absolute_positions_are_meliads_sinusoids():
    from meliad_core.layers.positions import absolute_position_embeddings

    emb = absolute_position_embeddings(6, 8)  # 4 wavelengths: 10000^(0, 1/4, 2/4, 3/4)
    k, j = 5, 2
    angle = np.pi * k / 10000.0 ** (j / 4)
    assert emb[k, j] == pytest.approx(np.cos(angle), rel=1e-6)  # cosine block first
    assert emb[k, 4 + j] == pytest.approx(np.sin(angle), rel=1e-6)
    np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])


def test_absolute_positions_change_the_logits_by_position():
    recipe = {"model": {**dict(num_layers=1, embed_dim=8, num_heads=2, head_dim=4, mlp_dim=8, vocab_size=5),
                        "absolute_positions": True, "position_bias": "none", "dropout": 0.0, "attn_dropout": 0.0},
              "attention": {"window": 4}, "data": {"segment_length": 4, "batch_size": 1}}
    model = make_model(recipe, streams=("predict",))
    logits = to_numpy(model({"tokens": np.full((1, 4), 3, "int32"), "start_of_sequence": np.array([True])}))
    assert not np.allclose(logits[0, 1], logits[0, 2])  # same token, same (uniform) context, other position
