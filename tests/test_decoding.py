"""Incremental decoding equals the segment path: teacher-forcing a text through the one-token step gives
the logits `model(...)` gives on the same text cut into segments, across window and segment boundaries
and a document reset, for every architecture (issue 11)."""

from __future__ import annotations

import numpy as np
import pytest

from model_helpers import make_model, randomize_weights, tiny_recipe, to_numpy

REC = {"layers": [-1], "num_states": 3}
CASES = {
    "xl": tiny_recipe("xl"),
    "xl_single_window": tiny_recipe("xl", window=8),
    "no_xl_cache": tiny_recipe("xl", window=8, attention={"window": 8, "xl_cache": False}),
    "xl_rotary_absolute": tiny_recipe("xl", model={"position_bias": "rotary", "absolute_positions": True}),
    "xl_alibi_bounded": tiny_recipe("xl", model={"position_bias": "alibi", "position_options": {"bounded": True}}),
    "xl_fourier": tiny_recipe("xl", model={"position_bias": "fourier"}),
    "xl_smear_keys": tiny_recipe("xl", model={"smear_keys": True}),
    "memorizing_bucketed": tiny_recipe("memory"),
    "memorizing_smear_keys": tiny_recipe("memory", model={"smear_keys": True}),
    "memorizing_exact": tiny_recipe("memory", memory={"layers": [-1], "size": 16, "neighbors": 4, "store": "exact"}),
    "memorizing_strides_mask": tiny_recipe("memory", memory={"layers": [0], "size": 16, "neighbors": 4,
                                                             "query_stride": 2, "update_stride": 2,
                                                             "empty": "mask"}),
    "memorizing_window_below_segment": tiny_recipe("memory", attention={"window": 4},
                                                   memory={"layers": [0], "size": 16, "neighbors": 4, "empty": "mask"}),
    "memorizing_exact_host": tiny_recipe("memory", memory={"layers": [-1], "size": 16, "neighbors": 4,
                                                           "store": "exact_host"}),
    "memorizing_host_strides_mask": tiny_recipe("memory", memory={"layers": [0], "size": 16, "neighbors": 4,
                                                                  "store": "exact_host", "query_stride": 2,
                                                                  "update_stride": 2, "empty": "mask"}),
    "recurrent_fixed_skip": tiny_recipe("recurrent"),
    "recurrent_lstm_single": tiny_recipe("recurrent", recurrence={**REC, "gate": "lstm", "variant": "single"}),
    "recurrent_fixed_dual": tiny_recipe("recurrent", recurrence={**REC, "gate": "fixed", "variant": "dual"}),
    "recurrent_lstm_dual": tiny_recipe("recurrent", recurrence={**REC, "gate": "lstm", "variant": "dual"}),
    "feedback": tiny_recipe("recurrent", model={"num_layers": 3},
                            recurrence={**REC, "layers": [1], "gate": "lstm", "variant": "skip", "feedback": True}),
}
NUM_SEGMENTS = 5
RESET_AT = 3  # row 0 starts a new document at this segment; row 1 keeps reading


def relative_error(actual, expected) -> float:
    return float(np.abs(actual.astype(np.float64) - expected).max()) / max(float(np.abs(expected).max()), 1e-6)


def text_and_starts(model, seed=1):
    rng = np.random.default_rng(seed)
    b, n = model.batch_size, model.segment_length
    tokens = rng.integers(1, model.vocab_size, size=(NUM_SEGMENTS, b, n)).astype("int32")
    starts = np.zeros((NUM_SEGMENTS, b), bool)
    starts[0] = True
    starts[RESET_AT, 0] = True
    return tokens, starts


def segment_logits(model, tokens, starts):
    model.reset_state("predict")
    return np.stack([to_numpy(model({"tokens": t, "start_of_sequence": s})) for t, s in zip(tokens, starts)])


def assert_teacher_forcing_equals_segments(model, label: str) -> None:
    """Every token stepped through the decoder gives the logits of the segment path (1e-5 relative)."""
    tokens, starts = text_and_starts(model)
    expected = segment_logits(model, tokens, starts)
    decoder = model.decoder()
    decoder.reset()
    for s in range(NUM_SEGMENTS):
        for p in range(model.segment_length):
            logits = decoder.step(tokens[s, :, p], starts[s] if p == 0 else None)
            error = relative_error(logits, expected[s, :, p])
            assert error <= 1e-5, f"{label}: segment {s} position {p}: relative error {error:.2e}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_teacher_forced_decoding_equals_segments(case):
    model = make_model(CASES[case], streams=("predict",))
    randomize_weights(model, seed=3)
    assert_teacher_forcing_equals_segments(model, case)


def test_decoder_state_converts_to_and_from_the_stream():
    """Prompt through the segment path, then token steps, equals token steps all along; and the
    decoding state written back into the stream continues the segment path exactly."""
    model = make_model(CASES["recurrent_fixed_skip"], streams=("predict",))
    randomize_weights(model, seed=4)
    tokens, starts = text_and_starts(model)
    expected = segment_logits(model, tokens, starts)
    flat = np.concatenate(list(tokens[:3]), axis=1)  # 3 segments of the first document
    decoder = model.decoder()
    decoder.reset()
    mixed = decoder.feed(flat[:, :20])  # two segments by the segment path, 4 tokens stepped
    assert decoder.position == 4
    mixed = np.concatenate([mixed, decoder.feed(flat[:, 20:])], axis=1)
    want = np.concatenate(list(expected[:3]), axis=1)
    assert relative_error(mixed, want) <= 1e-5
    decoder.store_stream("predict")
    got = to_numpy(model({"tokens": tokens[3], "start_of_sequence": starts[3]}))
    assert relative_error(got, expected[3]) <= 1e-5


def test_decoding_refuses_a_document_start_inside_a_segment():
    model = make_model(CASES["xl"], streams=("predict",))
    decoder = model.decoder()
    decoder.reset()
    decoder.step([1, 2])
    with pytest.raises(ValueError, match="segment boundary"):
        decoder.step([1, 2], start_of_sequence=True)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        decoder.step([1, 50])


def test_generate_greedy_is_argmax_of_the_segment_path():
    model = make_model(CASES["memorizing_bucketed"], streams=("predict",), batch_size=1)
    randomize_weights(model, seed=5)
    prompt = np.arange(1, 12, dtype="int32")
    ids = model.generate(prompt, max_tokens=10, sampler="greedy")
    assert ids.shape == (10,)
    text = np.concatenate([prompt, ids])
    # re-score the whole text with the segment path: each generated id is the argmax after its prefix
    n = model.segment_length
    padded = np.concatenate([text, np.ones(-len(text) % n, "int32")])
    model.reset_state("predict")
    logits = np.concatenate([to_numpy(model({"tokens": padded[None, i:i + n], "start_of_sequence": np.array([i == 0])}))[0]
                             for i in range(0, len(padded), n)])
    logits[:, 0] = -np.inf
    np.testing.assert_array_equal(np.argmax(logits[len(prompt) - 1:len(text) - 1], axis=-1), ids)


def test_generate_stops_at_a_stop_token():
    model = make_model(CASES["xl"], streams=("predict",), batch_size=1)
    randomize_weights(model, seed=6)
    first = model.generate([3, 4, 5], max_tokens=5, sampler="greedy")
    stopped = model.generate([3, 4, 5], max_tokens=5, sampler="greedy", stop_ids=[int(first[1])])
    np.testing.assert_array_equal(stopped, first[:list(first).index(first[1]) + 1])
