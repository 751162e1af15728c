"""Invariants of the three architectures that catch whole classes of bugs (on every backend)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from meliad_core.layers.knn_memory import filled_slots, reset_rows, write_segment
from meliad_memory.stores import BucketedStore, ExactStore
from model_helpers import TINY_MODEL, copy_trainable, make_model, randomize_weights, segment_batch, tiny_recipe, to_numpy

ARCHS = ["xl", "memory", "recurrent"]


def _document(rng, batch: int, length: int, vocab: int = 50) -> np.ndarray:
    return rng.integers(1, vocab, size=(batch, length)).astype("int32")


def _run(model, tokens: np.ndarray, segment_length: int, first_start=True) -> np.ndarray:
    """Feeds (B, T) tokens segment by segment (start flag on the first) and concatenates the logits."""
    outputs = []
    for i, s in enumerate(range(0, tokens.shape[1], segment_length)):
        batch = segment_batch(tokens[:, s:s + segment_length], first_start if i == 0 else False)
        outputs.append(to_numpy(model(batch)))
    return np.concatenate(outputs, axis=1)


@pytest.mark.parametrize("recurrence", [None, {"variant": "skip"}, {"variant": "dual", "gate": "lstm"},
                                        {"variant": "single", "gate": "lstm"}, {"feedback": True}, "smear"],
                         ids=["xl", "rec-fixed-skip", "rec-lstm-dual", "rec-lstm-single", "rec-feedback",
                              "xl-smear-keys"])
def test_same_logits_whatever_the_segment_length(recurrence):
    """Segments of W or of 4W give the same per-token logits: the cache and state carry exactly."""
    w = 4
    arch = "xl" if recurrence in (None, "smear") else "recurrent"
    extra = {"model": {"smear_keys": True}} if recurrence == "smear" else {}
    if isinstance(recurrence, dict):
        extra = {"recurrence": recurrence}
    short = make_model(tiny_recipe(arch, window=w, segment_length=w, **extra))
    long = make_model(tiny_recipe(arch, window=w, segment_length=4 * w, **extra))
    randomize_weights(short, seed=1)
    copy_trainable(short, long)
    tokens = _document(np.random.default_rng(0), 2, 8 * w)
    a, b = _run(short, tokens, w), _run(long, tokens, 4 * w)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_reset_touches_only_its_own_slot(arch):
    recipe = tiny_recipe(arch)
    model = make_model(recipe)
    randomize_weights(model, seed=2)
    n = recipe["data"]["segment_length"]
    rng = np.random.default_rng(3)
    first, second = _document(rng, 2, n), _document(rng, 2, n)

    def second_segment(start_flags):
        model.reset_state()
        model(segment_batch(first, True))
        return to_numpy(model(segment_batch(second, np.array(start_flags))))

    carried, reset_slot1 = second_segment([False, False]), second_segment([False, True])
    np.testing.assert_array_equal(carried[0], reset_slot1[0])  # slot 0 is untouched by slot 1's reset
    assert not np.allclose(carried[1], reset_slot1[1])
    model.reset_state()
    fresh = to_numpy(model(segment_batch(second, True)))
    np.testing.assert_allclose(reset_slot1[1], fresh[1], rtol=1e-5, atol=1e-6)  # a reset forgets everything


@pytest.mark.parametrize("store", [BucketedStore(), ExactStore()], ids=["bucketed", "exact"])
def test_memory_returns_what_was_written_fifo(store):
    rng = np.random.default_rng(4)
    batch, heads, n, size, dim = 2, 2, 4, 12, 8
    key_db = np.zeros((batch, heads, size, dim), "float32")
    value_db = np.zeros_like(key_db)
    index = np.zeros((batch,), "int32")
    segments = []
    for _ in range(4):  # 4 segments into a 3-segment memory: the first is overwritten
        keys = rng.normal(size=(batch, heads, n, dim)).astype("float32")
        keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
        values = rng.normal(size=(batch, heads, n, dim)).astype("float32")
        segments.append((keys, values))
        key_db, value_db, index = write_segment(key_db, value_db, index, keys, values)
    assert to_numpy(index).tolist() == [4 * n, 4 * n]
    kdb, vdb = to_numpy(key_db), to_numpy(value_db)
    np.testing.assert_array_equal(kdb[:, :, :n], segments[3][0])  # the 4th segment replaced the 1st
    np.testing.assert_array_equal(vdb[:, :, n:2 * n], segments[1][1])
    query_keys, query_values = segments[2]
    filled = filled_slots(index, size)
    rk, rv = store.retrieve(key_db, value_db, filled, query_keys, num_neighbors=4, query_chunk=2)
    rk, rv = to_numpy(rk), to_numpy(rv)
    # a stored key queried with itself scores highest (unit vectors): it is among the neighbours
    scores = np.einsum("bhnd,bhnkd->bhnk", query_keys, rk)
    best = scores.argmax(-1)
    got = np.take_along_axis(rv, best[..., None, None], axis=3)[..., 0, :]
    np.testing.assert_allclose(got, query_values, rtol=1e-6)
    key_db, value_db, index = reset_rows(key_db, value_db, index, np.array([True, False]))
    assert not to_numpy(key_db)[0].any() and to_numpy(key_db)[1].any() and to_numpy(index).tolist() == [0, 4 * n]


def test_empty_memory_halves_local_attention_at_init():
    """spec §7.4: with nothing in memory and the gate at σ(0) = 0.5, y = 0.5·y_local."""
    memory_model = make_model(tiny_recipe("memory"))
    randomize_weights(memory_model, seed=5)
    for var in memory_model.trainable_weights:
        if var.path.endswith("external_memory_bias"):
            var.assign(np.zeros(var.shape, "float32"))
    xl_model = make_model(tiny_recipe("xl", window=8, segment_length=8))
    xl_vars = {v.path: v for v in xl_model.trainable_weights}
    for var in memory_model.trainable_weights:
        if var.path in xl_vars:
            value = to_numpy(var.value)
            if var.path.endswith("transformer1/post_attn"):
                value = 0.5 * value  # halving the memory layer's attention output, linearly
            xl_vars[var.path].assign(value)
    tokens = _document(np.random.default_rng(6), 2, 8)
    np.testing.assert_allclose(to_numpy(memory_model(segment_batch(tokens, True))),
                               to_numpy(xl_model(segment_batch(tokens, True))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_memory_and_state_change_the_output_once_filled(arch):
    """The second segment's logits depend on the first: what was stored is really read back."""
    recipe = tiny_recipe(arch)
    model = make_model(recipe)
    randomize_weights(model, seed=7)
    n = recipe["data"]["segment_length"]
    rng = np.random.default_rng(8)
    first_a, first_b, second = _document(rng, 2, n), _document(rng, 2, n), _document(rng, 2, n)
    model(segment_batch(first_a, True))
    after_a = to_numpy(model(segment_batch(second, False)))
    model(segment_batch(first_b, True))
    after_b = to_numpy(model(segment_batch(second, False)))
    assert not np.allclose(after_a, after_b)


GRADIENT_TARGETS = {
    "memory": ["external_memory_bias", "transformer1/attention_scale"],
    "recurrent": ["recurrent_tbase/keys", "recurrent_tbase/queries2", "recurrent_tbase/post_attn",
                  "recurrent_tbase/state_ids", "recurrent_tbase/recurrent_initial_state",
                  "transformer1/queries2", "transformer1/attention_scale2"],
}


@pytest.mark.parametrize("arch,gate", [("memory", None), ("recurrent", "fixed"), ("recurrent", "lstm")])
def test_gradients_reach_memory_gate_and_recurrent_parameters(arch, gate):
    extra = {"recurrence": {"gate": gate}} if gate else {}
    model = make_model(tiny_recipe(arch, **extra))
    randomize_weights(model, seed=9)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1))
    before = {v.path: to_numpy(v.value).copy() for v in model.trainable_weights}
    recipe = tiny_recipe(arch)
    n = recipe["data"]["segment_length"]
    tokens = _document(np.random.default_rng(10), 2, 2 * n)
    x = {"tokens": np.concatenate([tokens[:, :n], tokens[:, n:]], axis=0),
         "start_of_sequence": np.array([True, True, False, False])}
    model.fit(x, batch_size=2, epochs=1, shuffle=False, verbose=0)
    gate_params = {"lstm": ["gate_attn/forget_gate", "gate_attn/input_gate_bias"], "fixed": ["gate_attn/gate_bias"]}
    targets = GRADIENT_TARGETS[arch] + gate_params.get(gate, [])
    for target in targets:
        matches = [p for p in before if p.endswith(target)]
        assert matches, target
        for path in matches:
            after = to_numpy(next(v for v in model.trainable_weights if v.path == path).value)
            assert not np.allclose(before[path], after), f"{path} got no gradient"
    assert all(not v.trainable for stream in model.state_vars.values() for v in stream.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_fit_carries_train_state_and_streams_stay_apart(arch):
    recipe = tiny_recipe(arch, window=8)  # one window a segment: the last keys depend on the carried cache
    n = recipe["data"]["segment_length"]
    model = make_model(recipe)
    randomize_weights(model, seed=11)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0))  # weights fixed: state is all that moves
    tokens = _document(np.random.default_rng(12), 2, 3 * n)
    segments = [tokens[:, i * n:(i + 1) * n] for i in range(3)]
    x = {"tokens": np.concatenate(segments, axis=0),
         "start_of_sequence": np.array([True, True] + [False] * 4)}
    history = model.fit(x, batch_size=2, epochs=1, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    trained = model.get_stream_state("train")
    assert all(not v.any() for v in model.get_stream_state("eval").values())
    assert all(not v.any() for v in model.get_stream_state("predict").values())
    for i, segment in enumerate(segments):  # the same segments through the predict stream, by hand
        model(segment_batch(segment, i == 0))
    by_hand = model.get_stream_state("predict")
    for key in trained:
        # compiled fit vs eager calls: equal to float32 rounding, relative to the state's scale
        scale = max(float(np.abs(by_hand[key]).max()), 1e-6)
        np.testing.assert_allclose(trained[key], by_hand[key], rtol=1e-5, atol=1e-5 * scale, err_msg=key)
    model.reset_state("predict")
    model(segment_batch(segments[2], True))
    alone = model.get_stream_state("predict")
    assert max(np.abs(trained[k] - alone[k]).max() for k in trained) > 1e-3  # the carried state mattered
    model.evaluate(x, batch_size=2, verbose=0)
    assert any(v.any() for v in model.get_stream_state("eval").values())
    for key, value in model.get_stream_state("train").items():
        np.testing.assert_array_equal(value, trained[key])  # evaluate never touches the train stream
    if arch == "memory":
        assert trained["transformer1/memory_index"].tolist() == [3 * n, 3 * n]


def test_wrong_batch_size_is_a_clear_error():
    model = make_model(tiny_recipe("xl"))
    with pytest.raises(ValueError, match="batch_size 2"):
        model(segment_batch(np.ones((3, 8), "int32"), True))


@pytest.mark.parametrize("feedback", [False, True], ids=["layer-windows", "stack-windows-feedback"])
def test_gradient_flows_from_window_to_window_inside_a_segment(feedback):
    """Within a segment the previous window's keys and the recurrent state carry gradient (spec §4.1, §8.3,
    §8.6); only what is stored for the next segment is cut."""
    from model_helpers import input_gradient

    model = make_model(tiny_recipe("recurrent", recurrence={"feedback": feedback}))
    randomize_weights(model, seed=13)
    stack = model.stack
    state = {key: var.value for key, var in model.state_vars["predict"].items()}
    sos = np.array([True, True])
    w = 4

    def window1_output(x):
        per_layer = stack.split_state(state)
        if feedback:
            y, _ = stack._feedback_windows(x, per_layer, sos, training=False)
        else:
            y = x
            for i, block in enumerate(stack.blocks):
                y, _ = block(y, per_layer[i], sos, training=False)
        return y[:, w:]

    x = np.random.default_rng(14).normal(size=(2, 2 * w, 16)).astype("float32")
    grad = input_gradient(window1_output, x)
    assert np.abs(grad[:, :w]).max() > 1e-4  # window 0's input reaches window 1's output


def test_smeared_keys_mix_in_the_previous_token_and_vanish_when_closed():
    """With `model.smear_keys` a key is σ(a)·K_t + (1 − σ(a))·K_(t−1): a → +∞ gives the plain model's
    logits exactly; a = 0 changes them; and the first token of a document mixes in no earlier key."""
    plain = make_model(tiny_recipe("memory"))
    smeared = make_model(tiny_recipe("memory", model={"smear_keys": True}))
    randomize_weights(plain, seed=2)
    by_path = {var.path: var for var in plain.trainable_weights}
    smears = [var for var in smeared.trainable_weights if var.path.endswith("key_smear")]
    assert len(smears) == TINY_MODEL["num_layers"]
    for var in smeared.trainable_weights:
        if var.path.endswith("key_smear"):
            var.assign(np.full(var.shape, 60.0, "float32"))  # σ = 1: the key of this token only
        else:
            var.assign(by_path[var.path].value)
    tokens = _document(np.random.default_rng(0), 2, 24)
    expected = _run(plain, tokens, 8)
    np.testing.assert_allclose(_run(smeared, tokens, 8), expected, rtol=1e-5, atol=1e-6)
    for var in smears:
        var.assign(np.zeros(var.shape, "float32"))
    half = _run(smeared, tokens, 8)
    assert np.abs(half - expected).max() > 1e-3
    # position 0 of a document: its previous key is zeros, whatever the previous document held
    first = to_numpy(smeared(segment_batch(tokens[:, :8], True)))
    _run(smeared, _document(np.random.default_rng(5), 2, 16), 8)  # another document before
    again = to_numpy(smeared(segment_batch(tokens[:, :8], True)))
    np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-6)
