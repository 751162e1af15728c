"""Incremental decoding with host memory stores (issue 11): the memory lives in host RAM and is reached
through host calls, queried by every token and written with whole segments at the segment path's
boundaries. `exact_host` runs on every backend; `hnsw` (plugins/meliad_hnswlib) where hnswlib is installed."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from meliad_core import plugins
from model_helpers import make_model, randomize_weights, tiny_recipe, to_numpy
from plugin_dists import make_distribution
from test_decoding import assert_teacher_forcing_equals_segments, relative_error, segment_logits, text_and_starts

RESET_FREE = 3  # the first three segments hold no document reset (text_and_starts resets row 0 at segment 3)
HOST = tiny_recipe("memory", memory={"layers": [-1], "size": 16, "neighbors": 4, "store": "exact_host"})


def host_model(recipe=HOST, seed=3, **kwargs):
    model = make_model(recipe, streams=("predict",), **kwargs)
    randomize_weights(model, seed=seed)
    return model


def test_prompt_through_the_segment_path_then_steps_equals_the_segment_path(installed_plugins):
    """feed() runs whole segments through the segment path (the model's predict stream, whose host memory
    is the decoder's) and the rest token by token: the logits equal the segment path's all along."""
    model = host_model()
    tokens, starts = text_and_starts(model)
    expected = segment_logits(model, tokens, starts)
    flat = np.concatenate(list(tokens[:RESET_FREE]), axis=1)
    decoder = model.decoder()
    decoder.reset()
    got = decoder.feed(flat[:, :21])  # two segments by the segment path, 5 tokens stepped
    assert decoder.position == 5
    got = np.concatenate([got, decoder.feed(flat[:, 21:])], axis=1)
    assert relative_error(got, np.concatenate(list(expected[:RESET_FREE]), axis=1)) <= 1e-5


def test_state_round_trip_includes_the_host_memory(installed_plugins):
    """get_state / set_state restore the host memory too: decoding after a restore repeats itself exactly,
    even after the memory has been overwritten in between."""
    model = host_model()
    tokens, _ = text_and_starts(model)
    decoder = model.decoder()
    decoder.reset()
    for p in range(8):  # one segment written into the memory
        decoder.step(tokens[0, :, p])
    for p in range(4):  # and 4 keys of the next one pending
        decoder.step(tokens[1, :, p])
    saved = decoder.get_state()
    assert any(key.startswith("host/") for key in saved)
    first = [decoder.step(tokens[1, :, p]) for p in range(4, 8)] + [decoder.step(tokens[2, :, p]) for p in range(8)]
    decoder.reset()
    for p in range(8):
        decoder.step(tokens[3, :, p])  # other keys in the memory now
    decoder.set_state(saved)
    again = [decoder.step(tokens[1, :, p]) for p in range(4, 8)] + [decoder.step(tokens[2, :, p]) for p in range(8)]
    np.testing.assert_array_equal(np.stack(first), np.stack(again))


def test_reset_empties_the_host_memory_without_document_resets(installed_plugins):
    """With reset_on_new_document false the token step never resets; Decoder.reset() still starts afresh."""
    recipe = tiny_recipe("memory", memory={**HOST["memory"], "reset_on_new_document": False})
    model = host_model(recipe)
    tokens, _ = text_and_starts(model)
    decoder = model.decoder()
    decoder.reset()
    fresh = [decoder.step(tokens[0, :, p]) for p in range(8)] + [decoder.step(tokens[1, :, p]) for p in range(8)]
    decoder.reset()
    again = [decoder.step(tokens[0, :, p]) for p in range(8)] + [decoder.step(tokens[1, :, p]) for p in range(8)]
    np.testing.assert_array_equal(np.stack(fresh), np.stack(again))


def test_continuing_another_stream_is_refused_in_one_line(installed_plugins):
    model = make_model(HOST, streams=("eval", "predict"))
    decoder = model.decoder()
    decoder.reset()
    with pytest.raises(ValueError, match="keeps its memory on the host.*only the 'predict' stream"):
        decoder.load_stream("eval")
    decoder.load_stream("predict")  # its own stream is fine


def test_generate_with_a_host_store_is_greedy_argmax_of_the_segment_path(installed_plugins):
    model = host_model(seed=5, batch_size=1)
    prompt = np.arange(1, 12, dtype="int32")
    ids = model.generate(prompt, max_tokens=20, sampler="greedy")  # crosses two segment boundaries
    text = np.concatenate([prompt, ids])
    n = model.segment_length
    padded = np.concatenate([text, np.ones(-len(text) % n, "int32")])
    model.reset_state("predict")
    logits = np.concatenate([to_numpy(model({"tokens": padded[None, i:i + n],
                                             "start_of_sequence": np.array([i == 0])}))[0]
                             for i in range(0, len(padded), n)])
    logits[:, 0] = -np.inf
    np.testing.assert_array_equal(np.argmax(logits[len(prompt) - 1:len(text) - 1], axis=-1), ids)


@pytest.fixture
def hnsw_plugin(tmp_path, monkeypatch):
    """plugins/meliad_hnswlib as if pip-installed (it is a distribution of its own)."""
    pytest.importorskip("hnswlib", reason="hnswlib is not installed (the hnsw store needs it)")
    import tomllib
    from pathlib import Path

    dist = Path(__file__).resolve().parent.parent / "plugins" / "meliad_hnswlib"
    project = tomllib.loads((dist / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    if "meliad_hnswlib" not in sys.modules:
        root = make_distribution(tmp_path / "dist", project["name"], project["version"],
                                 project["entry-points"]["meliad"], packages={"meliad_hnswlib": dist / "meliad_hnswlib"})
        monkeypatch.syspath_prepend(str(root))
    plugins.set_plugin_manager(None)
    yield
    plugins.set_plugin_manager(None)


def test_teacher_forced_decoding_with_hnsw_equals_segments(hnsw_plugin):
    """hnsw answers each query alone (single-threaded, fixed ef): a token's query finds what the same
    query finds in the segment path, so the logits match as for the exact stores."""
    recipe = tiny_recipe("memory", memory={"layers": [-1], "size": 16, "neighbors": 4, "store": "hnsw",
                                           "options": {"threads": 1, "blocks": 2}})
    assert_teacher_forcing_equals_segments(host_model(recipe), "hnsw")
