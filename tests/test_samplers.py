"""Samplers are plugins: the built-ins (greedy, temperature, top_k, top_p), their options, seeds, and a
third party's sampler registered through the `meliad_register_samplers` hook."""

from __future__ import annotations

import numpy as np
import pytest

from meliad_core import assemble, plugins
from meliad_core.config import RecipeError
from meliad_core.extend import categorical, hookimpl, top_k_filter, top_p_filter

LOGITS = np.log(np.array([[0.05, 0.5, 0.3, 0.1, 0.05], [0.4, 0.1, 0.1, 0.1, 0.3]], dtype=np.float32))


def draws(sampler, count=400, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([sampler.sample(LOGITS, rng) for _ in range(count)])


def test_builtin_samplers_are_registered():
    assert {"greedy", "temperature", "top_k", "top_p"} <= set(plugins.get_plugin_manager().names("sampler"))


def test_greedy_is_argmax():
    np.testing.assert_array_equal(assemble.sampler("greedy").sample(LOGITS, None), [1, 0])


def test_top_k_only_draws_the_k_best():
    got = draws(assemble.sampler("top_k", {"k": 2}))
    assert set(got[:, 0]) == {1, 2} and set(got[:, 1]) == {0, 4}


def test_top_p_keeps_the_nucleus():
    got = draws(assemble.sampler("top_p", {"p": 0.65}))
    assert set(got[:, 0]) == {1, 2}  # 0.5 + 0.3 reaches 0.65
    assert set(got[:, 1]) == {0, 4}  # 0.4 + 0.3 (0.4 alone does not)
    np.testing.assert_array_equal(top_p_filter(LOGITS, 1e-6) > -np.inf, top_k_filter(LOGITS, 1) > -np.inf)


def test_temperature_frequencies_and_seed():
    sampler = assemble.sampler("temperature", {"temperature": 1.0})
    got = draws(sampler, count=4000)
    freq = np.bincount(got[:, 0], minlength=5) / len(got)
    np.testing.assert_allclose(freq, [0.05, 0.5, 0.3, 0.1, 0.05], atol=0.03)
    np.testing.assert_array_equal(draws(sampler, seed=7), draws(sampler, seed=7))
    assert not np.array_equal(draws(sampler, seed=7), draws(sampler, seed=8))
    cold = draws(assemble.sampler("temperature", {"temperature": 0.05}), count=100)
    assert (cold[:, 0] == 1).all()


def test_banned_ids_are_never_drawn():
    logits = LOGITS.copy()
    logits[:, 1] = -np.inf
    rng = np.random.default_rng(0)
    assert all(1 not in categorical(logits, rng) for _ in range(200))


@pytest.mark.parametrize("name, options, match", [
    ("top_k", {"k": 0}, "sampler.k"),
    ("top_p", {"p": 1.5}, "sampler.p"),
    ("temperature", {"temperature": -1.0}, "sampler.temperature"),
    ("greedy", {"temperature": 0.5}, "temperature"),
])
def test_bad_options_are_one_line_errors(name, options, match):
    with pytest.raises(RecipeError, match=match) as info:
        assemble.sampler(name, options)
    assert "\n" not in str(info.value)


def test_unknown_sampler_lists_the_known_ones():
    with pytest.raises(plugins.PluginError, match="greedy"):
        assemble.sampler("nucleus9")


class LastIdPlugin:
    """A third party's sampler: always the highest id that is not banned."""

    class LastId:
        def sample(self, logits, rng):
            finite = np.isfinite(logits)
            return logits.shape[-1] - 1 - np.argmax(finite[:, ::-1], axis=-1)

    @hookimpl
    def meliad_register_samplers(self, register):
        register("last_id", self.LastId(), description="test sampler")


def test_third_party_sampler_drives_generation():
    manager = plugins.load_plugin_manager(extra_plugins=[("last_id_plugin", LastIdPlugin())])
    plugins.set_plugin_manager(manager)
    try:
        assert manager.get("sampler", "last_id").distribution == "(in process)"
        from model_helpers import make_model, tiny_recipe

        model = make_model(tiny_recipe("xl"), streams=("predict",), batch_size=1)
        ids = model.generate([1, 2, 3], max_tokens=4, sampler="last_id")
        np.testing.assert_array_equal(ids, [49, 49, 49, 49])
        ids = model.generate([1, 2, 3], max_tokens=4, sampler="last_id", banned_ids=(0, 49))
        np.testing.assert_array_equal(ids, [48, 48, 48, 48])
    finally:
        plugins.set_plugin_manager(None)
