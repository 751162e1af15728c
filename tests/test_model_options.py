"""The original's remaining model options, each checked for what it computes (meliad's defaults are
covered by the golden file and the spec tests)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from keras import ops

from meliad_core.layers.block import TransformerBlock
from meliad_core.layers.knn_memory import KNNMemory
from meliad_core.model import token_losses
from model_helpers import make_model, randomize_weights, tiny_recipe, to_numpy

B, N, H, D, E = 2, 8, 2, 4, 8


def _np_norm(x, scale, use_mean, bias):
    if use_mean:
        x = x - x.mean(-1, keepdims=True)
    y = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * scale
    return y if bias is None else y + bias


NP_ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0),
    "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2))),  # the exact form
    "swish": lambda x: x / (1 + np.exp(-x)),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
}


@pytest.mark.parametrize("activation", ["relu", "swish", "tanh", "sigmoid", "gelu"])
@pytest.mark.parametrize("use_bias,use_mean", [(False, False), (True, True)])
def test_ffn_activation_bias_and_norm(activation, use_bias, use_mean):
    block = TransformerBlock(embed_dim=E, num_heads=H, head_dim=D, mlp_dim=16, window=N, xl_cache=False,
                             position="none", mlp_activation=activation, mlp_use_bias=use_bias,
                             norm_use_mean=use_mean, norm_use_bias=use_bias, name="block")
    block.build(None)
    rng = np.random.default_rng(0)
    for var in block.trainable_weights:
        var.assign(rng.normal(size=tuple(var.shape)).astype("float32"))
    block.w_out.assign(np.zeros(tuple(block.w_out.shape), "float32"))  # attention adds nothing: h = x (+ b_out)
    x = rng.normal(size=(B, N, E)).astype("float32")
    y, _ = block(ops.convert_to_tensor(x), {}, ops.convert_to_tensor(np.ones((B,), bool)))
    value = lambda v: to_numpy(v.value)  # noqa: E731
    h = x + (value(block.b_out) if use_bias else 0)
    norm = block.pre_ffn_norm
    hidden = _np_norm(h, value(norm.scale), use_mean, value(norm.bias) if use_bias else None) @ value(block.w_1)
    if use_bias:
        hidden = hidden + value(block.b_1)
    act = NP_ACTIVATIONS[activation]
    expected = h + act(hidden) @ value(block.w_2) + (value(block.b_2) if use_bias else 0)
    np.testing.assert_allclose(to_numpy(y), expected, rtol=2e-5, atol=2e-5)
    assert (block.b_1 is not None) == use_bias and (norm.bias is not None) == use_bias


def test_without_causal_mask_tokens_see_later_tokens_of_their_window():
    def outputs(causal, tokens):
        model = make_model(tiny_recipe("xl", model={"use_causal_mask": causal}), streams=("predict",))
        randomize_weights(model, seed=1)
        return to_numpy(model({"tokens": tokens, "start_of_sequence": np.array([True, True])}))

    tokens = np.random.default_rng(2).integers(1, 50, size=(2, 8)).astype("int32")
    changed = tokens.copy()
    changed[:, 6] = (changed[:, 6] % 49) + 1  # a later token, in the second window (W=4)
    for causal in (True, False):
        a, b = outputs(causal, tokens), outputs(causal, changed)
        earlier_moved = np.abs(a[:, 4:6] - b[:, 4:6]).max()  # positions 4, 5: same window, before token 6
        assert (earlier_moved > 1e-4) != causal, (causal, earlier_moved)
        np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-5)  # the first window never sees window 2


def test_embedding_stddev_final_layernorm_and_final_mlp():
    recipe = tiny_recipe("xl", model={"vocab_size": 2000, "embed_dim": 32, "embedding_stddev": 0.25,
                                      "use_final_layernorm": False, "final_mlp": True})
    model = make_model(recipe, streams=("predict",))
    paths = [v.path for v in model.trainable_weights]
    assert not any("final_layernorm" in p for p in paths)
    assert {"meliad_lm/decoder/final_mlp/hidden0", "meliad_lm/decoder/final_mlp/output_layer"} <= set(paths)
    assert abs(float(np.std(to_numpy(model.stack.embedding.value))) - 0.25) < 0.01
    batch = {"tokens": np.ones((2, 8), "int32"), "start_of_sequence": np.array([True, True])}
    assert np.abs(to_numpy(model(batch))).max() > 0
    model.stack.final_mlp.w_output.assign(np.zeros(tuple(model.stack.final_mlp.w_output.shape), "float32"))
    np.testing.assert_array_equal(to_numpy(model(batch)), 0.0)  # the MLP's output is what meets the embedding


@pytest.mark.parametrize("final_dropout,changes", [(0.0, False), (0.5, True)])
def test_final_dropout_is_its_own_rate(final_dropout, changes):
    recipe = tiny_recipe("xl", model={"dropout": 0.0, "attn_dropout": 0.0, "final_dropout": final_dropout})
    model = make_model(recipe, streams=("train", "predict"))
    randomize_weights(model, seed=3)
    batch = {"tokens": np.full((2, 8), 7, "int32"), "start_of_sequence": np.array([True, True])}
    train = to_numpy(model(batch, training=True))
    infer = to_numpy(model(batch, training=False))
    assert (np.abs(train - infer).max() > 1e-4) == changes


def _memory_layer(**options):
    layer = KNNMemory(num_heads=H, head_dim=D, size=2 * N, neighbors=4, store="exact", name="memory", **options)
    layer.build(None)
    layer.gate_bias.assign(np.full((H,), 0.3, "float32"))
    return layer


def _filled_state(rng, written):
    return {"memory_keys": ops.convert_to_tensor(rng.normal(size=(B, H, 2 * N, D)).astype("float32")),
            "memory_values": ops.convert_to_tensor(rng.normal(size=(B, H, 2 * N, D)).astype("float32")),
            "memory_index": ops.convert_to_tensor(np.full((B,), written, "int32"))}


def test_query_stride_retrieves_for_every_sth_query_only():
    rng = np.random.default_rng(4)
    q, k, v, y_local = (ops.convert_to_tensor(rng.normal(size=(B, N, H, D)).astype("float32")) for _ in range(4))
    state = _filled_state(rng, 2 * N)
    no = ops.convert_to_tensor(np.zeros((B,), bool))
    every, _ = _memory_layer()(q, k, v, y_local, dict(state), no)
    strided, _ = _memory_layer(query_stride=2)(q, k, v, y_local, dict(state), no)
    every, strided, local = to_numpy(every), to_numpy(strided), to_numpy(y_local)
    np.testing.assert_allclose(strided[:, 0::2], every[:, 0::2], rtol=1e-5, atol=1e-6)
    g = 1 / (1 + np.exp(-0.3))
    np.testing.assert_allclose(strided[:, 1::2], (1 - g) * local[:, 1::2], rtol=1e-5, atol=1e-6)  # zeros retrieved


def test_update_stride_writes_every_sth_key():
    rng = np.random.default_rng(5)
    q, k, v, y_local = (ops.convert_to_tensor(rng.normal(size=(B, N, H, D)).astype("float32")) for _ in range(4))
    state = _filled_state(rng, 0)
    _, new = _memory_layer(update_stride=4)(q, k, v, y_local, state, ops.convert_to_tensor(np.ones((B,), bool)))
    keys = to_numpy(new["memory_keys"])
    np.testing.assert_array_equal(to_numpy(new["memory_index"]), [N // 4] * B)
    np.testing.assert_allclose(keys[:, :, :N // 4], np.transpose(to_numpy(k)[:, 3::4], (0, 2, 1, 3)))


@pytest.mark.parametrize("reset", [True, False])
def test_reset_on_new_document(reset):
    rng = np.random.default_rng(6)
    q, k, v, y_local = (ops.convert_to_tensor(rng.normal(size=(B, N, H, D)).astype("float32")) for _ in range(4))
    state = _filled_state(rng, N)
    before = to_numpy(state["memory_keys"])
    starts = ops.convert_to_tensor(np.array([True, False]))
    _, new = _memory_layer(reset_on_new_document=reset)(q, k, v, y_local, state, starts)
    index, keys = to_numpy(new["memory_index"]), to_numpy(new["memory_keys"])
    assert index[1] == 2 * N  # the row that continues its document always keeps its memory
    np.testing.assert_array_equal(keys[1, :, :N], before[1, :, :N])
    if reset:
        assert index[0] == N and not keys[0, :, N:].any()
    else:  # a new document in row 0 keeps the row's memory: the segment is appended after it
        assert index[0] == 2 * N
        np.testing.assert_array_equal(keys[0, :, :N], before[0, :, :N])


def test_memory_stored_in_bfloat16():
    recipe = tiny_recipe("memory", memory={"dtype": "bfloat16"})
    model = make_model(recipe, streams=("predict",))
    assert str(model.state_vars["predict"]["transformer1/memory_keys"].dtype) == "bfloat16"
    batch = {"tokens": np.full((2, 8), 3, "int32"), "start_of_sequence": np.array([True, True])}
    model(batch)
    logits = to_numpy(model(dict(batch, start_of_sequence=np.array([False, False]))))
    assert np.isfinite(logits).all()
    assert str(make_model(tiny_recipe("memory"), streams=("predict",))
               .state_vars["predict"]["transformer1/memory_keys"].dtype) == "float32"  # auto: model.dtype


def test_loss_mask_ids_exclude_their_targets():
    tokens = ops.convert_to_tensor(np.array([[5, 6, 7, 6, 8, 0, 6, 9]], "int32"))
    logits = ops.zeros((1, 8, 10))
    _, valid, _ = token_losses(tokens, logits)
    _, masked, _ = token_losses(tokens, logits, loss_mask_ids=(6,))
    np.testing.assert_array_equal(to_numpy(valid), [[1, 1, 1, 1, 0, 0, 1, 0]])
    np.testing.assert_array_equal(to_numpy(masked), [[0, 1, 0, 1, 0, 0, 1, 0]])  # targets 6 at 0 and 2 are out


def test_gate_init_and_masked_empty_memory():
    rng = np.random.default_rng(7)
    q, k, v, y_local = (ops.convert_to_tensor(rng.normal(size=(B, N, H, D)).astype("float32")) for _ in range(4))
    starts = ops.convert_to_tensor(np.ones((B,), bool))
    empty = _filled_state(rng, 0)
    layer = KNNMemory(num_heads=H, head_dim=D, size=2 * N, neighbors=4, store="exact", gate_init=2.0, empty="mask")
    layer.build(None)
    np.testing.assert_array_equal(to_numpy(layer.gate_bias.value), [2.0] * H)
    y, _ = layer(q, k, v, y_local, dict(empty), starts)
    np.testing.assert_allclose(to_numpy(y), to_numpy(y_local), rtol=1e-6)  # nothing written: local attention only
    meliad = KNNMemory(num_heads=H, head_dim=D, size=2 * N, neighbors=4, store="exact", gate_init=2.0)
    meliad.build(None)
    y_zeros, _ = meliad(q, k, v, y_local, dict(empty), starts)
    g = 1 / (1 + np.exp(-2.0))
    np.testing.assert_allclose(to_numpy(y_zeros), (1 - g) * to_numpy(y_local), rtol=1e-5, atol=1e-6)
    # two filled slots of four neighbours: the masked softmax is over those two only
    state = _filled_state(rng, N)
    keys = np.zeros((B, H, 2 * N, D), "float32")
    keys[:, :, :2] = rng.normal(size=(B, H, 2, D))
    values = rng.normal(size=(B, H, 2 * N, D)).astype("float32")
    state.update(memory_keys=ops.convert_to_tensor(keys), memory_values=ops.convert_to_tensor(values),
                 memory_index=ops.convert_to_tensor(np.full((B,), 2, "int32")))
    y, _ = layer(q, k, v, y_local, state, ops.convert_to_tensor(np.zeros((B,), bool)))
    qn = np.transpose(to_numpy(q), (0, 2, 1, 3))  # (B, H, N, D)
    logits = np.einsum("bhnd,bhmd->bhnm", qn, keys[:, :, :2])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y_memory = np.transpose(np.einsum("bhnm,bhmd->bhnd", probs, values[:, :, :2]), (0, 2, 1, 3))
    np.testing.assert_allclose(to_numpy(y), (1 - g) * to_numpy(y_local) + g * y_memory, rtol=1e-4, atol=1e-5)
