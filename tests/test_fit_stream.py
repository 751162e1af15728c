"""Plain keras.Model.fit on the batch stream, as README shows, for every architecture."""

from __future__ import annotations

import numpy as np
import pytest

from meliad_core.config import validate_recipe
from meliad_core.data import keras_batches, stream
from meliad_core.model import build_model
from meliad_core.optimizers import make_optimizer
from model_helpers import tiny_recipe


@pytest.mark.parametrize("arch", ["xl", "memory", "recurrent"])
def test_fit_on_the_stream_trains_and_carries_state(arch):
    mapping = tiny_recipe(arch, window=16, segment_length=32)
    mapping["model"]["vocab_size"] = None  # from the bytes vocabulary
    mapping["data"]["options"] = {"num_documents": 8, "num_eval_documents": 2, "document_length": 1500}
    mapping["train"] = {"steps": 6, "warmup": 0, "learning_rate": {"schedule": "constant", "max": 0.01}}
    recipe = validate_recipe(mapping)
    model = build_model(recipe)
    model.compile(optimizer=make_optimizer(recipe.train))
    batches = stream(recipe, split="train")
    history = model.fit(keras_batches(batches), steps_per_epoch=3, epochs=2, verbose=0)
    losses = history.history["loss"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert history.history["bits_per_token"][-1] < history.history["bits_per_token"][0] + 0.5
    assert any(v.any() for v in model.get_stream_state("train").values())
    assert not any(v.any() for v in model.get_stream_state("eval").values())
    result = model.evaluate(keras_batches(stream(recipe, split="eval")), steps=2, verbose=0,
                            return_dict=True)
    assert np.isfinite(result["bits_per_token"])
    assert any(v.any() for v in model.get_stream_state("eval").values())
