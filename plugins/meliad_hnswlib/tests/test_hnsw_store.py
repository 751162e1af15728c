"""The `hnsw` store: meliad's store tests (FIFO round trip across wrap-arounds, resets, resume) plus
recall against exact top-k, the block ring's eviction, and the plugin's registration and options."""

from __future__ import annotations

import numpy as np
import pytest

from meliad_core import assemble, plugins
from meliad_core.config import RecipeError


def driver(**kwargs):
    from test_memory_stores import StoreDriver

    return StoreDriver(assemble.memory_store("hnsw", kwargs.pop("options", None)), **kwargs)


def test_registered_with_version_and_options():
    found = plugins.get_plugin_manager().get("memory_store", "hnsw")
    assert found.distribution == "meliad-hnswlib" and found.version == "0.1.0"
    assert set(found.options) == {"ef_search", "ef_construction", "links", "blocks", "threads"}
    with pytest.raises(RecipeError, match="memory.options.ef_search"):
        assemble.options_for("memory_store", "hnsw", {"ef_search": 0}, "memory.options")


@pytest.mark.parametrize("blocks", [1, 4])
def test_round_trip_across_wrap_arounds(blocks):
    from test_memory_stores import check_round_trip

    check_round_trip(driver(options={"blocks": blocks}))


def test_reset_touches_only_its_row():
    from test_memory_stores import check_resets

    check_resets(driver())


def test_recall_against_exact_at_default_options():
    """recall@32 against exact top-k on a wrapped memory of 4096 clustered keys per (row, head) (meliad's
    helper: nothing evicted may come back either)."""
    from test_memory_stores import recall_against_exact

    recall = recall_against_exact(driver(batch=1, heads=2, size=4096, dim=32))
    assert recall >= 0.9, recall


def test_resume_is_bit_identical(tmp_path):
    from test_memory_stores import memory_recipe, resume_is_bit_identical

    resume_is_bit_identical(tmp_path, memory_recipe("hnsw", size=32), steps=8, split=5)


def test_state_rebuilds_identical_indexes():
    """load_state replays the indexes: a restored store answers every later query exactly as the original."""
    from test_memory_stores import clustered

    rng = np.random.default_rng(3)
    a = driver(size=64, options={"blocks": 2})
    for _ in range(11):  # wrapped, old block partly deleted
        a.write("train", clustered(rng, (2, 2, 8, 8), rng.normal(size=(4, 8))), rng.normal(size=(2, 2, 8, 8)))
    b = driver(size=64, options={"blocks": 2})
    b.store.load_state(a.store.state())
    for _ in range(5):
        queries = clustered(rng, (2, 2, 16, 8), rng.normal(size=(4, 8)))
        for x, y in zip(a.retrieve("train", queries, 8), b.retrieve("train", queries, 8)):
            np.testing.assert_array_equal(x, y)
        keys = clustered(rng, (2, 2, 8, 8), rng.normal(size=(4, 8)))
        values = rng.normal(size=(2, 2, 8, 8)).astype(np.float32)
        a.write("train", keys, values)
        b.write("train", keys, values)


def test_trains_under_meliad_run(tmp_path):
    from test_memory_stores import test_host_store_trains_under_meliad_run

    import test_memory_stores

    original = test_memory_stores.HOST_RUN_STORE
    test_memory_stores.HOST_RUN_STORE = "hnsw"
    try:
        test_host_store_trains_under_meliad_run(tmp_path, None)
    finally:
        test_memory_stores.HOST_RUN_STORE = original
