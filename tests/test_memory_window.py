"""A memory layer with a window shorter than the segment (meliad allows it but advises against it, spec
7.1; the recall and books demos use it): a token sees its window and, through the memory, the earlier
segments, and nothing else."""

from __future__ import annotations

import numpy as np

from model_helpers import make_model, randomize_weights, tiny_recipe, to_numpy

RECIPE = tiny_recipe("memory", model={"num_layers": 1}, attention={"window": 2},
                     memory={"layers": [0], "size": 16, "neighbors": 4, "empty": "mask", "store": "exact"})


def _logits(model, segments):
    model.reset_state("predict")
    starts = [np.array([True, True])] + [np.array([False, False])] * (len(segments) - 1)
    return [to_numpy(model({"tokens": t, "start_of_sequence": s})) for t, s in zip(segments, starts)]


def test_a_token_sees_its_window_and_earlier_segments_only():
    model = make_model(RECIPE, streams=("predict",))
    randomize_weights(model, seed=5)
    rng = np.random.default_rng(0)
    first, second = (rng.integers(1, model.vocab_size, size=(2, 8)).astype("int32") for _ in range(2))
    base = _logits(model, [first, second])[1]

    # tokens 0-1 of the segment lie outside the window of tokens 6-7 (blocks of 2: they see 4-7)
    # and are not in the memory yet (it holds whole earlier segments): no effect on 6-7
    early = second.copy()
    early[:, :2] = (early[:, :2] % (model.vocab_size - 1)) + 1
    changed = _logits(model, [first, early])[1]
    np.testing.assert_allclose(changed[:, 6:], base[:, 6:], rtol=1e-6, atol=1e-6)
    assert np.abs(changed[:, :4] - base[:, :4]).max() > 1e-4  # inside their windows they do count

    # the previous segment reaches tokens 6-7 only through the memory: it must change them
    other = (first % (model.vocab_size - 1)) + 1
    through_memory = _logits(model, [other, second])[1]
    assert np.abs(through_memory[:, 6:] - base[:, 6:]).max() > 1e-4
