"""Position plugins (plugins/meliad_positions): t5, rotary, fourier, alibi and none, on the strategy layers
and their factories. Expected numbers come from meliad's formulas written out here in numpy, independently
of the implementation's code path (spec §2.4; meliad position.py, position_fourier.py, head position_alibi.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from meliad_core import plugins
from meliad_core.config import RecipeError
from meliad_positions import make_alibi, make_fourier, make_no_bias, make_rotary, make_t5_bias
from meliad_positions.alibi import ALiBiBias, alibi_slopes
from meliad_positions.t5 import T5RelativeBias, relative_position_bucket


def np_(x) -> np.ndarray:
    return np.array(ops.convert_to_numpy(ops.convert_to_tensor(x)), copy=True)  # a copy: torch shares storage


def rel_np(num_queries: int, num_keys: int, offset: int) -> np.ndarray:
    """r[i, j] = j − (i + offset), written out here (spec §2.1)."""
    return np.arange(num_keys)[None, :] - (np.arange(num_queries)[:, None] + offset)


def make(factory, options=None, *, num_heads=2, head_dim=8, window=4, name="relative_positions"):
    layer = factory(num_heads=num_heads, head_dim=head_dim, window=window, options=options, name=name)
    if layer is not None:
        layer.build(None)
    return layer


pytestmark = pytest.mark.usefixtures("installed_plugins")


# ----------------------------------------------------------------------------------------------
# Registration


def test_all_position_types_are_registered_with_their_options():
    registry = plugins.get_plugin_manager().registry("position_bias")
    assert {"t5", "rotary", "fourier", "alibi", "none"} <= set(registry)
    declared = {name: set(registry[name].options or {}) for name in ("t5", "rotary", "fourier", "alibi", "none")}
    assert declared == {
        "t5": {"num_buckets", "max_distance"},
        "rotary": {"max_wavelength"},
        "fourier": {"position_vector_size", "max_wavelength"},
        "alibi": {"bounded", "bound", "learn_bound", "per_head_bound"},
        "none": set(),
    }
    t5, rotary, fourier = registry["t5"].options, registry["rotary"].options, registry["fourier"].options
    assert (t5["num_buckets"].default, t5["max_distance"].default) == (32, 128)
    assert rotary["max_wavelength"].default == 10_000
    assert (fourier["position_vector_size"].default, fourier["max_wavelength"].default) == (128, 0)
    assert all(entry.description for entry in registry.values())


def test_registering_imports_no_keras():
    code = ("import sys, meliad_positions, meliad_recurrence; "
            "sys.exit(1 if any(m in sys.modules for m in ('keras', 'jax', 'torch', 'tensorflow')) else 0)")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_none_is_no_strategy():
    assert make(make_no_bias) is None


# ----------------------------------------------------------------------------------------------
# t5


def test_t5_options_are_honoured():
    layer = make(make_t5_bias, {"num_buckets": 16, "max_distance": 20}, num_heads=3, name="t5_layer")
    assert isinstance(layer, T5RelativeBias) and layer.name == "t5_layer"
    (table,) = layer.weights
    assert table.path.endswith("rel_embedding") and tuple(table.shape) == (3, 16)
    values = np.random.default_rng(0).normal(size=(3, 16)).astype("float32")
    table.assign(values)
    bias = np_(layer.compute_bias(4, 40, 36))
    buckets = relative_position_bucket(rel_np(4, 40, 36), num_buckets=16, max_distance=20)
    assert bias.shape == (3, 4, 40)
    np.testing.assert_array_equal(bias, values[:, buckets])
    assert buckets.max() == 15  # max_distance 20 puts distances ≥ 20 in the last bucket
    assert not np.array_equal(buckets, relative_position_bucket(rel_np(4, 40, 36), num_buckets=16))


def test_t5_defaults_are_meliads():
    layer = make(make_t5_bias, {})
    assert (layer.num_buckets, layer.max_distance) == (32, 128)
    assert tuple(layer.weights[0].shape) == (2, 32)


def test_t5_rejects_a_max_distance_inside_the_exact_buckets():
    with pytest.raises(RecipeError, match=r"model\.position_options\.max_distance"):
        make(make_t5_bias, {"num_buckets": 32, "max_distance": 16})


# ----------------------------------------------------------------------------------------------
# rotary


def rotary_reference(x: np.ndarray, positions: np.ndarray, max_wavelength: float) -> np.ndarray:
    """meliad's rotate_kq for one tensor, as complex numbers: pair t = x[t] + i·x[D/2 + t] times e^{iπp/λ_t}."""
    half = x.shape[-1] // 2
    wavelengths = max_wavelength ** (np.arange(half) / half)
    angles = np.pi * positions[:, None, None] / wavelengths  # (N, 1, D/2), broadcast over heads
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angles)
    return np.concatenate([z.real, z.imag], axis=-1)


def scores(q, k) -> np.ndarray:
    """(B, G, H, Q, K) dot products."""
    return np.einsum("bgqhd,bgkhd->bghqk", q, k)


def test_rotary_hand_worked_case():
    # D = 4: half-wavelengths 10000^(0/2, 1/2) = (1, 100); layout [x0, x1, y0, y1], pairs (x_t, y_t)
    layer = make(make_rotary, {})
    key = np.array([1.0, 2.0, 3.0, 4.0], dtype="float32").reshape(1, 1, 1, 1, 4)
    query = np.array([1.0, 0.0, 0.0, 1.0], dtype="float32").reshape(1, 1, 1, 1, 4)
    q2 = np.concatenate([query, query], axis=2)  # two queries, at positions 0 and 1
    k2 = np.concatenate([key, key], axis=2)  # two keys; offset 1 puts them at positions -1 and 0
    q_rot, k_rot = (np_(t) for t in layer.transform(ops.convert_to_tensor(q2), ops.convert_to_tensor(k2), 1))
    c, s = np.cos(np.pi / 100), np.sin(np.pi / 100)
    # key 0 at position -1: pair 0 turned by -π -> (-1, -3); pair 1 by -π/100
    np.testing.assert_allclose(k_rot[0, 0, 0, 0], [-1.0, 2 * c + 4 * s, -3.0, -2 * s + 4 * c], atol=1e-6)
    np.testing.assert_allclose(k_rot[0, 0, 1, 0], [1, 2, 3, 4], atol=1e-6)  # position 0: unchanged
    np.testing.assert_allclose(q_rot[0, 0, 0, 0], [1, 0, 0, 1], atol=1e-6)  # query 0 at position 0
    np.testing.assert_allclose(q_rot[0, 0, 1, 0], [-1.0, -s, 0.0, c], atol=1e-6)  # query 1: π and π/100


def test_rotary_matches_meliads_formula_on_random_inputs():
    rng = np.random.default_rng(1)
    layer = make(make_rotary, {"max_wavelength": 500.0}, head_dim=16)
    q = rng.normal(size=(2, 3, 4, 2, 16)).astype("float32")
    k = rng.normal(size=(2, 3, 8, 2, 16)).astype("float32")
    q_rot, k_rot = (np_(t) for t in layer.transform(ops.convert_to_tensor(q), ops.convert_to_tensor(k), 4))
    np.testing.assert_allclose(q_rot, rotary_reference(q, np.arange(4.0), 500.0), atol=2e-5)
    np.testing.assert_allclose(k_rot, rotary_reference(k, np.arange(8.0) - 4, 500.0), atol=2e-5)


def test_rotary_preserves_norms():
    rng = np.random.default_rng(2)
    layer = make(make_rotary, {}, head_dim=32)
    q = rng.normal(size=(1, 2, 16, 2, 32)).astype("float32") * 3
    k = rng.normal(size=(1, 2, 32, 2, 32)).astype("float32")
    q_rot, k_rot = (np_(t) for t in layer.transform(ops.convert_to_tensor(q), ops.convert_to_tensor(k), 16))
    np.testing.assert_allclose(np.linalg.norm(q_rot, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(k_rot, axis=-1), np.linalg.norm(k, axis=-1), rtol=1e-5)
    assert not np.allclose(k_rot, k)


@pytest.mark.parametrize("offset", [0, 5, 8])
def test_rotary_scores_depend_only_on_relative_position(offset):
    """The same query content at every position and the same key content at every key: the score of
    (i, j) is then a function of j − (i + offset) alone, for any offset."""
    rng = np.random.default_rng(3)
    layer = make(make_rotary, {}, head_dim=8)
    num_q, num_k = 8, 8 + offset
    q = np.broadcast_to(rng.normal(size=(1, 1, 1, 2, 8)), (1, 1, num_q, 2, 8)).astype("float32")
    k = np.broadcast_to(rng.normal(size=(1, 1, 1, 2, 8)), (1, 1, num_k, 2, 8)).astype("float32")
    q_rot, k_rot = (np_(t) for t in layer.transform(ops.convert_to_tensor(q), ops.convert_to_tensor(k), offset))
    s = scores(q_rot, k_rot)[0, 0]  # (H, Q, K)
    rel = rel_np(num_q, num_k, offset)
    for r in np.unique(rel):
        values = s[:, rel == r]  # (H, count)
        np.testing.assert_allclose(values, values[:, :1].repeat(values.shape[1], axis=1), atol=1e-4)
    assert not np.allclose(s[:, rel == -1][:, 0], s[:, rel == -2][:, 0])  # and it does depend on it
    # shifting both positions (a larger offset is every key moved back) gives the same score per distance
    q_far, k_far = (np_(t) for t in layer.transform(ops.convert_to_tensor(q), ops.convert_to_tensor(k),
                                                     offset + 3))
    s_far = scores(q_far, k_far)[0, 0]
    rel_far = rel_np(num_q, num_k, offset + 3)
    for r in (-1, -2, -3):
        np.testing.assert_allclose(s_far[:, rel_far == r][:, 0], s[:, rel == r][:, 0], atol=1e-4)


def test_rotary_rejects_an_odd_head_dim():
    with pytest.raises(RecipeError, match="head_dim"):
        make(make_rotary, {}, head_dim=7)


# ----------------------------------------------------------------------------------------------
# fourier


def fourier_reference(rotation: np.ndarray, rel: np.ndarray, max_wavelength: float) -> np.ndarray:
    """Σ_t a[h,t]·cos(π r/λ_t) + b[h,t]·sin(π r/λ_t): what meliad's rotated-position dot product reduces to."""
    half = rotation.shape[1] // 2
    a, b = rotation[:, :half], rotation[:, half:]
    wavelengths = max_wavelength ** (np.arange(half) / half)
    angles = np.pi * rel[..., None] / wavelengths  # (Q, K, P/2)
    return np.einsum("ht,qkt->hqk", a, np.cos(angles)) + np.einsum("ht,qkt->hqk", b, np.sin(angles))


def test_fourier_weight_and_initialiser_are_meliads():
    layer = make(make_fourier, {}, num_heads=3, window=16)
    (rotation,) = layer.weights
    assert rotation.path.endswith("rotation_matrix") and tuple(rotation.shape) == (3, 128)
    values = np_(rotation)
    np.testing.assert_array_equal(values[:, :64], np.full((3, 64), 2 / 128, dtype="float32"))
    np.testing.assert_array_equal(values[:, 64:], 0.0)
    assert layer.max_wavelength == 32.0  # 2·window, as meliad's TransformerLayer builds it
    # at init the bias is (2/P)·Σ cos(π r/λ): exactly 1 where the key is the query's own position
    bias = np_(layer.compute_bias(16, 32, 16))
    np.testing.assert_allclose(bias[:, rel_np(16, 32, 16) == 0], 1.0, atol=1e-5)


def test_fourier_two_by_two_hand_worked():
    # P = 2: one wave of half-wavelength 1, so cos(π r) = (−1)^r and sin(π r) = 0: bias = a·(−1)^r
    layer = make(make_fourier, {"position_vector_size": 2, "max_wavelength": 10.0}, num_heads=2)
    layer.weights[0].assign(np.array([[0.3, 0.7], [-2.0, 5.0]], dtype="float32"))
    bias = np_(layer.compute_bias(2, 4, 2))  # rel = [[-2, -1, 0, 1], [-3, -2, -1, 0]]
    expected = np.array([[[0.3, -0.3, 0.3, -0.3], [-0.3, 0.3, -0.3, 0.3]],
                         [[-2.0, 2.0, -2.0, 2.0], [2.0, -2.0, 2.0, -2.0]]])
    np.testing.assert_allclose(bias, expected, atol=1e-5)


def test_fourier_four_hand_worked():
    # P = 4, max_wavelength 16: half-wavelengths 16^(0/2, 1/2) = (1, 4); a = (1, 2), b = (0, 3) for head 0
    layer = make(make_fourier, {"position_vector_size": 4, "max_wavelength": 16.0}, num_heads=1)
    layer.weights[0].assign(np.array([[1.0, 2.0, 0.0, 3.0]], dtype="float32"))
    bias = np_(layer.compute_bias(1, 3, 2))  # one query at position 2; keys at 0, 1, 2 -> r = -2, -1, 0
    # r = -2: cos(-2π) + 2cos(-π/2) + 3 sin(-π/2) = 1 + 0 − 3;  r = -1: −1 + 2cos(π/4) − 3 sin(π/4);  r = 0: 1 + 2
    root = np.sqrt(0.5)
    np.testing.assert_allclose(bias[0, 0], [-2.0, -1.0 + 2 * root - 3 * root, 3.0], atol=1e-5)


@pytest.mark.parametrize("geometry", [(8, 16, 8), (8, 8, 0), (1, 8, 8), (3, 5, -2)])
def test_fourier_matches_meliads_formula_with_learned_rotations(geometry):
    num_q, num_k, offset = geometry
    rng = np.random.default_rng(4)
    layer = make(make_fourier, {}, num_heads=2, window=8)  # P 128, max wavelength 16
    rotation = rng.normal(0, 0.1, size=(2, 128)).astype("float32")
    layer.weights[0].assign(rotation)
    bias = np_(layer.compute_bias(num_q, num_k, offset))
    assert bias.shape == (2, num_q, num_k)
    np.testing.assert_allclose(bias, fourier_reference(rotation.astype(np.float64), rel_np(num_q, num_k, offset),
                                                       16.0), atol=2e-4)


def test_fourier_options_are_checked():
    with pytest.raises(RecipeError, match=r"position_options\.position_vector_size"):
        make(make_fourier, {"position_vector_size": 7})
    with pytest.raises(RecipeError, match=r"position_options\.max_wavelength"):
        make(make_fourier, {"max_wavelength": 0.5})
    assert make(make_fourier, {"max_wavelength": 100.0}).max_wavelength == 100.0


# ----------------------------------------------------------------------------------------------
# alibi


def test_alibi_slopes_are_the_papers_geometric_sequence():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -h for h in range(1, 9)])
    np.testing.assert_allclose(alibi_slopes(4), [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8])
    np.testing.assert_allclose(alibi_slopes(1), [2.0 ** -8])


def test_alibi_bias_is_minus_slope_times_distance():
    layer = make(make_alibi, {}, num_heads=2)
    assert isinstance(layer, ALiBiBias) and layer.weights == []  # fixed, nothing learned
    bias = np_(layer.compute_bias(2, 4, 2))  # keys at distances [[2, 1, 0, -1], [3, 2, 1, 0]] before the queries
    distance = np.array([[2.0, 1.0, 0.0, 1.0], [3.0, 2.0, 1.0, 0.0]])  # |r| (future keys are masked anyway)
    np.testing.assert_allclose(bias, np.stack([-distance / 16, -distance / 256]), rtol=1e-6)
    bias_w = np_(layer.compute_bias(4, 8, 4))  # meliad's window geometry (W, 2W, offset W)
    np.testing.assert_allclose(bias_w, -alibi_slopes(2)[:, None, None] * np.abs(rel_np(4, 8, 4)), rtol=1e-6)


def test_bounded_alibi_is_meliad_heads_variant():
    layer = make(make_alibi, {"bounded": True}, num_heads=2)
    names = sorted(w.path.split("/")[-1] for w in layer.weights)
    assert names == ["bound", "scale"]
    scale = next(w for w in layer.weights if w.path.endswith("scale"))
    bound = next(w for w in layer.weights if w.path.endswith("bound"))
    assert np_(scale) == 1.0 and np_(bound).tolist() == [1.0]  # meliad head's inits
    scale.assign(np.float32(-4.0))  # |scale| is used
    bound.assign(np.array([-0.3], dtype="float32"))  # and −|bound|
    bias = np_(layer.compute_bias(2, 4, 2))
    plain = -alibi_slopes(2)[:, None, None] * np.abs(rel_np(2, 4, 2))
    np.testing.assert_allclose(bias, np.maximum(4.0 * plain, -0.3), rtol=1e-6)
    assert bias.min() == pytest.approx(-0.3)


def test_bounded_alibi_fixed_and_per_head_bounds():
    fixed = make(make_alibi, {"bounded": True, "bound": 0.1, "learn_bound": False}, num_heads=2)
    assert [w.path.split("/")[-1] for w in fixed.weights] == ["scale"]
    plain = -alibi_slopes(2)[:, None, None] * np.abs(rel_np(3, 6, 3))
    np.testing.assert_allclose(np_(fixed.compute_bias(3, 6, 3)), np.maximum(plain, -0.1), rtol=1e-6)
    per_head = make(make_alibi, {"bounded": True, "per_head_bound": True}, num_heads=3)
    bound = next(w for w in per_head.weights if w.path.endswith("bound"))
    assert tuple(bound.shape) == (3,)
    bound.assign(np.array([0.05, 0.5, 5.0], dtype="float32"))
    plain3 = -alibi_slopes(3)[:, None, None] * np.abs(rel_np(3, 6, 3))
    np.testing.assert_allclose(np_(per_head.compute_bias(3, 6, 3)),
                               np.maximum(plain3, -np.array([0.05, 0.5, 5.0])[:, None, None]), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# All strategies


@pytest.mark.parametrize("factory,options", [
    (make_t5_bias, {"num_buckets": 8, "max_distance": 40}),
    (make_rotary, {"max_wavelength": 77.0}),
    (make_fourier, {"position_vector_size": 16, "max_wavelength": 9.0}),
    (make_alibi, {"bounded": True, "bound": 2.0, "learn_bound": False}),
])
def test_strategies_serialize_with_get_config(factory, options):
    layer = make(factory, options)
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    clone.build(None)
    assert [tuple(w.shape) for w in clone.weights] == [tuple(w.shape) for w in layer.weights]


def test_bias_strategies_leave_queries_and_keys_alone_and_rotary_gives_no_bias():
    q = ops.ones((1, 1, 2, 2, 8))
    k = ops.ones((1, 1, 4, 2, 8))
    for factory in (make_t5_bias, make_fourier, make_alibi):
        layer = make(factory, {})
        q_out, k_out = layer.transform(q, k, 2)
        assert q_out is q and k_out is k
        assert tuple(layer.compute_bias(2, 4, 2).shape) == (2, 2, 4)
    assert make(make_rotary, {}).compute_bias(2, 4, 2) is None


def test_biases_are_float32_and_finite_in_the_window_geometry():
    for factory in (make_t5_bias, make_fourier, make_alibi):
        bias = make(factory, {}, num_heads=4, window=64).compute_bias(64, 128, 64)
        assert keras.backend.standardize_dtype(bias.dtype) == "float32"
        assert np.isfinite(np_(bias)).all()


# ----------------------------------------------------------------------------------------------
# In a model (meliad_core.assemble resolves `model.position_bias` and `model.position_options`)

MODEL_POSITIONS = [("t5", {}), ("rotary", {}), ("fourier", {"position_vector_size": 16}), ("alibi", {}),
                   ("alibi", {"bounded": True, "per_head_bound": True}), ("none", {})]


def _model(position: str, options: dict, segment_length: int, arch: str = "xl"):
    from model_helpers import make_model, tiny_recipe

    model_section = {**tiny_recipe()["model"], "position_bias": position, "position_options": dict(options)}
    return make_model(tiny_recipe(arch, window=4, segment_length=segment_length, model=model_section))


def _logits(model, tokens: np.ndarray, segment_length: int) -> np.ndarray:
    from model_helpers import segment_batch, to_numpy

    return np.concatenate([to_numpy(model(segment_batch(tokens[:, s:s + segment_length], s == 0)))
                           for s in range(0, tokens.shape[1], segment_length)], axis=1)


@pytest.mark.parametrize("position,options", MODEL_POSITIONS,
                         ids=["t5", "rotary", "fourier", "alibi", "alibi-bounded", "none"])
def test_each_position_type_runs_in_a_model_and_carries_across_segments(position, options):
    """Finite logits, and segments of W or 4W give the same logits: the strategy sees the same window
    geometry (Q = W, K = 2W, offset W) whether the previous block comes from the cache or the segment."""
    from model_helpers import copy_trainable, randomize_weights

    pytest.importorskip("meliad_core.assemble")
    short, long = _model(position, options, 4), _model(position, options, 16)
    randomize_weights(short, seed=1)
    copy_trainable(short, long)
    tokens = np.random.default_rng(0).integers(1, 50, size=(2, 32)).astype("int32")
    a, b = _logits(short, tokens, 4), _logits(long, tokens, 16)
    assert a.shape == (2, 32, 50) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    names = {w.path.split("/")[-1] for w in short.trainable_weights}
    expected = {"t5": "rel_embedding", "fourier": "rotation_matrix"}.get(position)
    assert expected is None or expected in names


def test_position_types_change_the_logits():
    from model_helpers import copy_trainable, randomize_weights

    pytest.importorskip("meliad_core.assemble")
    tokens = np.random.default_rng(1).integers(1, 50, size=(2, 8)).astype("int32")
    base = _model("none", {}, 8)
    randomize_weights(base, seed=3)
    reference = _logits(base, tokens, 8)
    for position in ("rotary", "alibi"):  # no weights of their own: same weights as `none`
        other = _model(position, {}, 8)
        copy_trainable(base, other)
        assert not np.allclose(_logits(other, tokens, 8), reference, atol=1e-4), position
