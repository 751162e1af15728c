"""Memory stores, device and host alike: FIFO round trips across wrap-arounds, resets, host-call
ordering inside compiled steps, and resumes that end bit-identical (issue 13).

`StoreDriver` gives both kinds of store the host lifecycle's shape (reset / write / retrieve per
stream) so that one set of tests covers them: a device store's memory is tensors updated with core's
own `reset_rows` / `write_segment`, a host store's is its own. Other distributions' stores (the
`hnsw` store of plugins/meliad_hnswlib) reuse `StoreDriver` and `check_round_trip` in their tests.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from meliad_core import assemble
from meliad_core.config import RecipeError, validate_recipe
from meliad_core.host_store import HostMemoryStore, is_host_store
from meliad_core.layers import knn_memory
from model_helpers import make_model, tiny_recipe, to_numpy

BACKEND = keras.backend.backend()
JAX_STORES = ["jax_approx"]  # registered by backends/meliad_jax for the jax backend only
DEVICE_STORES = ["bucketed", "exact"] + (JAX_STORES if BACKEND == "jax" else [])
HOST_STORES = ["exact_host"]
HOST_RUN_STORE = "exact_host"  # the store test_host_store_trains_under_meliad_run runs (other distributions reuse it)


class StoreDriver:
    """One store's memories for `streams`, (batch, heads, size, dim), driven as core drives it."""

    def __init__(self, store, streams=("train", "eval"), batch=2, heads=2, size=32, dim=8, options=None):
        self.store, self.batch, self.heads, self.size, self.dim = store, batch, heads, size, dim
        self.host = is_host_store(store)
        if self.host:
            self.store = store.new()
            self.store.init(tuple(streams), batch, heads, dim, dict(options or {}), size=size)
        else:
            shape = (batch, heads, size, dim)
            self.dbs = {s: [np.zeros(shape, np.float32), np.zeros(shape, np.float32), np.zeros((batch,), np.int32)]
                        for s in streams}

    def reset(self, stream, rows):
        if self.host:
            return self.store.reset(stream, list(rows))
        sos = np.isin(np.arange(self.batch), list(rows))
        self.dbs[stream] = [to_numpy(t) for t in knn_memory.reset_rows(*self.dbs[stream], sos)]

    def write(self, stream, keys, values):
        if self.host:
            return self.store.write(stream, keys, values)
        self.dbs[stream] = [to_numpy(t) for t in knn_memory.write_segment(*self.dbs[stream], keys, values)]

    def retrieve(self, stream, queries, k):
        if self.host:
            return self.store.retrieve(stream, queries, k)
        key_db, value_db, index = self.dbs[stream]
        keys, values = self.store.retrieve(key_db, value_db, knn_memory.filled_slots(index, self.size), queries, k, 0)
        return to_numpy(keys), to_numpy(values)


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def check_round_trip(driver: StoreDriver, segments=13, n=8, seed=0):
    """Writes `segments` segments of n entries (several wrap-arounds); after each, every entry still in
    the FIFO window, queried with its own key, comes back first with exactly its key and value, and
    entries that left the window never come back."""
    rng = np.random.default_rng(seed)
    b_, h_, d = driver.batch, driver.heads, driver.dim
    written_k, written_v = [], []
    for step in range(segments):
        keys = unit(rng.normal(size=(b_, h_, n, d)))
        values = rng.normal(size=(b_, h_, n, d)).astype(np.float32)
        driver.write("train", keys, values)
        written_k.append(keys)
        written_v.append(values)
        all_k, all_v = np.concatenate(written_k, axis=2), np.concatenate(written_v, axis=2)
        live_k, live_v = all_k[:, :, -driver.size:], all_v[:, :, -driver.size:]
        got_k, got_v = driver.retrieve("train", live_k, 1)
        np.testing.assert_array_equal(got_k[:, :, :, 0], live_k)
        np.testing.assert_array_equal(got_v[:, :, :, 0], live_v)
        gone = all_k[:, :, :-driver.size]
        if gone.shape[2]:
            got_k, _ = driver.retrieve("train", gone, 1)
            assert not np.any(np.all(got_k[:, :, :, 0] == gone, axis=-1)), "an evicted entry came back"
    assert segments * n >= 3 * driver.size  # the test wrapped around at least twice


def clustered(rng, shape, centers):
    """Unit keys around a few centres: many near neighbours, where an approximate top-k can miss."""
    x = centers[rng.integers(0, len(centers), shape[:-1])] + 0.35 * rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def recall_against_exact(driver: StoreDriver, k=32, segments=20, n=256, seed=0) -> float:
    """recall@k of `driver`'s store against the device `exact` store on the same wrapped-around memory of
    clustered keys; each value names its entry, so hits are counted by entry, and nothing evicted may
    come back."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, driver.dim))
    exact = StoreDriver(assemble.memory_store("exact"), batch=driver.batch, heads=driver.heads, size=driver.size,
                        dim=driver.dim)
    shape = (driver.batch, driver.heads, n, driver.dim)
    for step in range(segments):
        keys = clustered(rng, shape, centers)
        values = np.broadcast_to(np.arange(step * n, (step + 1) * n, dtype=np.float32)[None, None, :, None],
                                 shape).copy()
        driver.write("train", keys, values)
        exact.write("train", keys, values)
    assert segments * n > driver.size  # wrapped around
    queries = clustered(rng, shape, centers)
    got, want = driver.retrieve("train", queries, k)[1][..., 0], exact.retrieve("train", queries, k)[1][..., 0]
    assert got.min() >= segments * n - driver.size  # nothing evicted comes back
    return float(np.mean([len(set(g) & set(w)) / k for g, w in zip(got.reshape(-1, k), want.reshape(-1, k))]))


def check_resets(driver: StoreDriver, n=8, seed=1):
    """A reset empties only its row of its stream."""
    rng = np.random.default_rng(seed)
    b_, h_, d = driver.batch, driver.heads, driver.dim
    data = {}
    for stream in ("train", "eval"):
        keys = unit(rng.normal(size=(b_, h_, n, d)))
        values = rng.normal(size=(b_, h_, n, d)).astype(np.float32)
        driver.write(stream, keys, values)
        data[stream] = (keys, values)
    before = {s: driver.retrieve(s, data[s][0], 1) for s in data}
    driver.reset("train", [0])
    got_k, got_v = driver.retrieve("train", data["train"][0], 1)
    assert not got_k[0].any() and not got_v[0].any()  # row 0 of train: empty
    np.testing.assert_array_equal(got_k[1:], before["train"][0][1:])  # row 1 untouched
    np.testing.assert_array_equal(got_v[1:], before["train"][1][1:])
    for i, got in enumerate(driver.retrieve("eval", data["eval"][0], 1)):  # the other stream untouched
        np.testing.assert_array_equal(got, before["eval"][i])


@pytest.mark.parametrize("name", DEVICE_STORES + HOST_STORES)
def test_round_trip_across_wrap_arounds(name, installed_plugins):
    check_round_trip(StoreDriver(assemble.memory_store(name)))


@pytest.mark.parametrize("name", DEVICE_STORES + HOST_STORES)
def test_reset_touches_only_its_row(name, installed_plugins):
    check_resets(StoreDriver(assemble.memory_store(name)))


@pytest.mark.parametrize("name", [s for s in DEVICE_STORES + HOST_STORES if s not in ("bucketed", "exact")])
def test_recall_against_exact_at_default_options(name, installed_plugins):
    """The stores that stand for exact top-k (bucketed is meliad's one-per-bucket kNN, a different retrieval)."""
    recall = recall_against_exact(StoreDriver(assemble.memory_store(name), batch=1, heads=2, size=4096, dim=32))
    assert recall >= 0.9, recall


@pytest.mark.skipif(BACKEND != "jax", reason="jax_approx serves the jax backend only")
def test_jax_approx_is_exact_top_k_off_tpu(installed_plugins):
    """On CPU and GPU XLA runs approx_max_k's exact fallback: the same neighbours as `exact`, for any
    recall_target, with zeros where fewer slots than k are filled and in unwritten rows."""
    import jax

    if jax.default_backend() == "tpu":
        pytest.skip("approximate on TPU (its recall is tested above)")
    rng = np.random.default_rng(4)
    stores = {"exact": StoreDriver(assemble.memory_store("exact")),
              **{t: StoreDriver(assemble.memory_store("jax_approx", {"recall_target": t})) for t in (0.95, 0.5)}}
    for step in range(6):
        keys = unit(rng.normal(size=(2, 2, 8, 8)))
        values = rng.normal(size=(2, 2, 8, 8)).astype(np.float32)
        queries = unit(rng.normal(size=(2, 2, 8, 8)))
        want = stores["exact"].retrieve("train", queries, 12)
        for target in (0.95, 0.5):
            for got, expected in zip(stores[target].retrieve("train", queries, 12), want):
                np.testing.assert_array_equal(got, expected)
        for driver in stores.values():
            driver.write("train", keys, values)
        if step == 0:
            assert not want[0].any()  # an empty memory gives zeros
    keys, _ = stores[0.95].retrieve("train", queries, 64)  # k above the memory size (32): zeros beyond
    assert keys.shape[3] == 64 and keys[:, :, :, :32].any(axis=-1).all() and not keys[:, :, :, 32:].any()


def test_jax_approx_is_registered_for_jax_only_with_its_options(installed_plugins):
    from meliad_core import plugins

    found = plugins.get_plugin_manager().get("memory_store", "jax_approx")
    assert found.backends == ("jax",) and set(found.options) == {"recall_target"}
    assert assemble.options_for("memory_store", "jax_approx", {}, "memory.options") == {"recall_target": 0.95}
    with pytest.raises(RecipeError, match=r"^memory.options.recall_target: got 0.0, expected a number in"):
        assemble.options_for("memory_store", "jax_approx", {"recall_target": 0}, "memory.options")
    recipe = validate_recipe(memory_recipe("jax_approx"))
    for backend in ("torch", "tensorflow"):
        with pytest.raises(RecipeError) as info:
            assemble.check_recipe(recipe, backend=backend)
        assert str(info.value) == (f"memory.store: got 'jax_approx' (from meliad), which is not available on the "
                                   f"{backend} backend: serves jax only")
    if BACKEND != "jax":
        with pytest.raises(plugins.PluginError, match="'jax_approx' from meliad is not available: serves jax only"):
            assemble.memory_store("jax_approx")


def test_jax_approx_is_listed_by_meliad_plugins(installed_plugins, monkeypatch):
    from click.testing import CliRunner

    from meliad_core.cli import cli

    monkeypatch.setenv("KERAS_BACKEND", BACKEND)
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    (line,) = [row.split() for row in result.output.splitlines() if row.split()[:2] == ["memory_store", "jax_approx"]]
    assert line[2] == "meliad" and line[4] == "jax"  # distribution, version, backends
    if BACKEND == "jax":
        assert "available" in line and "unavailable:" not in line
    else:
        assert "unavailable: serves jax only" in " ".join(line)


@pytest.mark.skipif(BACKEND != "jax", reason="jax_approx serves the jax backend only")
def test_jax_approx_trains_like_exact(installed_plugins):
    """In the model's compiled steps (off TPU) jax_approx gives the `exact` store's losses and logits."""
    results = {}
    for store in ("exact", "jax_approx"):
        model = make_model(memory_recipe(store))
        model.compile(optimizer="adam")
        results[store] = train_and_eval(model, batches(7), batches(3, seed=5))
    np.testing.assert_allclose(results["jax_approx"][0], results["exact"][0], rtol=1e-6)
    for a, b in zip(results["jax_approx"][1], results["exact"][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_exact_host_matches_exact_store(installed_plugins):
    """Top-k (k > 1, fewer filled slots than k at first) agrees with the device `exact` store."""
    rng = np.random.default_rng(2)
    device, host = (StoreDriver(assemble.memory_store(n)) for n in ("exact", "exact_host"))
    for step in range(6):
        keys = unit(rng.normal(size=(2, 2, 8, 8)))
        values = rng.normal(size=(2, 2, 8, 8)).astype(np.float32)
        queries = unit(rng.normal(size=(2, 2, 8, 8)))
        for got_d, got_h in zip(device.retrieve("train", queries, 12), host.retrieve("train", queries, 12)):
            np.testing.assert_allclose(got_h, got_d, rtol=1e-6, atol=1e-6)
        device.write("train", keys, values)
        host.write("train", keys, values)


# -- the model: host calls inside compiled steps ------------------------------------------------------------


def memory_recipe(store: str, **memory):
    return tiny_recipe("memory", memory={"layers": [-1], "size": 32, "neighbors": 4, "store": store, **memory},
                       train={"seed": 3})


def batches(count, seed=0, resets=(0, 4)):
    rng = np.random.default_rng(seed)
    return [{"tokens": rng.integers(1, 50, (2, 8)).astype("int32"),
             "start_of_sequence": np.array([step == 0, step in resets])} for step in range(count)]


def train_and_eval(model, data, eval_data):
    logs = [model.train_on_batch(x, return_dict=True)["loss"] for x in data]
    logits = [to_numpy(model.predict_on_batch(x)) for x in eval_data]
    return logs, logits


def test_host_store_trains_compiled_like_the_device_store(installed_plugins):
    """exact_host inside the compiled train step (no run_eagerly) gives the device `exact` store's losses,
    weights and logits: the host call resets, then retrieves the memory as it was, then writes."""
    results = {}
    for store in ("exact", "exact_host"):
        model = make_model(memory_recipe(store))
        model.compile(optimizer="adam")
        assert not model.run_eagerly
        logs, logits = train_and_eval(model, batches(7), batches(3, seed=5))
        results[store] = (logs, logits, [to_numpy(w) for w in model.trainable_weights])
    np.testing.assert_allclose(results["exact_host"][0], results["exact"][0], rtol=1e-5)
    for a, b in zip(results["exact_host"][1], results["exact"][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(results["exact_host"][2], results["exact"][2]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


class Recording(HostMemoryStore):
    """Wraps a host store and records every lifecycle call (stream, kind, entries)."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def reset(self, stream, rows):
        self.log.append((stream, "reset", tuple(rows)))
        self.inner.reset(stream, rows)

    def retrieve(self, stream, queries, k):
        self.log.append((stream, "retrieve", queries.shape[2]))
        return self.inner.retrieve(stream, queries, k)

    def write(self, stream, keys, values):
        self.log.append((stream, "write", int(keys[0, 0, 0, 0] * 1e6)))  # which segment, by its first key
        self.inner.write(stream, keys, values)

    def state(self):
        return self.inner.state()

    def load_state(self, state):
        self.inner.load_state(state)


def test_host_calls_run_in_order_with_their_stream(installed_plugins):
    model = make_model(memory_recipe("exact_host"))
    (layer,) = model._host_memories
    log = []
    layer._host_store = Recording(layer.host_store(), log)
    model.compile(optimizer="sgd")
    data = batches(4, resets=(2,))
    for x in data:
        model.train_on_batch(x)
    model.test_on_batch(data[0])
    model.predict_on_batch(data[1])
    from meliad_core.host_calls import host_barrier

    host_barrier()
    train = [entry for entry in log if entry[0] == "train"]
    kinds = [entry[1] for entry in train]
    assert kinds == ["reset", "retrieve", "write", "retrieve", "write", "reset", "retrieve", "write",
                     "retrieve", "write"]
    assert [entry[2] for entry in train if entry[1] == "reset"] == [(0,), (1,)]  # rows starting a document
    writes = [entry[2] for entry in train if entry[1] == "write"]
    assert len(set(writes)) == 4  # four different segments, each written once
    assert [entry[:2] for entry in log if entry[0] != "train"] == [
        ("eval", "reset"), ("eval", "retrieve"), ("eval", "write"), ("predict", "retrieve"), ("predict", "write")]
    # the host store keeps the memory: nothing in the model's variables
    assert not any("memory" in key for key in model.state_vars["train"])


def test_reset_state_empties_the_host_memory(installed_plugins):
    model = make_model(memory_recipe("exact_host"))
    model.compile(optimizer="sgd")
    for x in batches(2):
        model.train_on_batch(x)
    assert model.host_state()[f"{model._host_memories[0].path}/train/count"].tolist() == [16, 16]
    model.reset_state("train")
    state = model.host_state()
    assert state[f"{model._host_memories[0].path}/train/count"].tolist() == [0, 0]
    assert not state[f"{model._host_memories[0].path}/train/keys"].any()


def resume_is_bit_identical(tmp_path, recipe, steps=6, split=3):
    """Trains `steps` steps straight, and `split` steps, checkpoint (with the host state), a new process's
    worth of model and optimizer, restore, the rest: weights, optimizer and eval logits are identical."""
    from meliad_core import checkpoint as ckpt
    from meliad_core.optimizers import make_optimizer
    import copy

    data, eval_data = batches(steps, resets=(0, 4)), batches(2, seed=9)

    def fresh():
        model = make_model(copy.deepcopy(recipe))
        optimizer = make_optimizer(validate_recipe(copy.deepcopy(recipe)).train, steps)
        model.compile(optimizer=optimizer)
        optimizer.build(model.trainable_variables)
        return model, optimizer

    straight, _ = fresh()
    for x in data:
        straight.train_on_batch(x)
    expected = [to_numpy(straight.predict_on_batch(x)) for x in eval_data]

    first, optimizer = fresh()
    for x in data[:split]:
        first.train_on_batch(x)
    path = ckpt.save_checkpoint(tmp_path, split, first, optimizer, extra={})  # host state included
    del first

    resumed, optimizer = fresh()
    manifest, arrays = ckpt.read_checkpoint(path)
    ckpt.restore(resumed, optimizer, manifest, arrays)
    for x in data[split:]:
        resumed.train_on_batch(x)
    for a, b in zip(resumed.trainable_weights, straight.trainable_weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    for x, want in zip(eval_data, expected):
        np.testing.assert_array_equal(to_numpy(resumed.predict_on_batch(x)), want)
    np.testing.assert_equal(resumed.host_state(), straight.host_state())


@pytest.mark.parametrize("store", ["exact", "exact_host"] + (JAX_STORES if BACKEND == "jax" else []))
def test_resume_is_bit_identical(tmp_path, store, installed_plugins):
    resume_is_bit_identical(tmp_path, memory_recipe(store))


def test_host_store_trains_under_meliad_run(tmp_path, installed_plugins):
    """`meliad run` (compiled steps, checkpoints) with a host store, on the running backend."""
    import keras
    from click.testing import CliRunner

    from meliad_core.cli import cli

    recipe = tmp_path / "host.yaml"
    recipe.write_text(
        "include: memorizing_tiny\n"
        "model: {num_layers: 2, embed_dim: 16, num_heads: 2, head_dim: 8, mlp_dim: 32}\n"
        "attention: {window: 16}\n"
        f"memory: {{layers: [-1], size: 64, neighbors: 4, store: {HOST_RUN_STORE}}}\n"
        "data: {segment_length: 16, batch_size: 2}\n"
        "train: {steps: 4, log_every: 2, checkpoint_every: 2, warmup: 1}\n"
        "eval: {every: 4, steps: 1}\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["run", str(recipe), "--backend", keras.backend.backend(),
                                      "--workdir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "bits/tok" in result.output
