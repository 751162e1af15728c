"""The plugin manager with real distributions: built-ins, a third-party plugin, broken plugins.

A distribution is made "installed" the way pip would leave it, minus pip: a folder with the package
and a `<name>-<version>.dist-info` (METADATA, entry_points.txt), put on sys.path for one test.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest

from meliad_core import assemble, plugins, recipes
from meliad_core.hookspecs import hookimpl
from plugin_dists import BROKEN_IMPORT, example_project, install_example, make_distribution

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory) -> Path:
    """tests/third_party_plugin as if pip-installed."""
    return install_example(tmp_path_factory.mktemp("example"))


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory) -> Path:
    """Two broken third-party distributions: one cannot be imported, one's hook raises."""
    root = tmp_path_factory.mktemp("broken")
    make_distribution(root, "meliad-broken-import", "1.0", {"broken_import": "meliad_broken_import"},
                      modules=BROKEN_IMPORT)
    make_distribution(root, "meliad-broken-hook", "1.1", {"broken_hook": "meliad_broken_hook"}, modules={
        "meliad_broken_hook": '''
            from meliad_core.hookspecs import hookimpl

            @hookimpl
            def meliad_register_memory_stores(register):
                raise RuntimeError("broken on purpose in the hook")
            '''})
    return root


@pytest.fixture(scope="module")
def shadow_dir(tmp_path_factory) -> Path:
    """A third party that reuses the built-in entry-point name `memory`."""
    return make_distribution(tmp_path_factory.mktemp("shadow"), "meliad-shadow", "3.0", {"memory": "meliad_shadow"},
                             modules={"meliad_shadow": '''
                                 from meliad_core.hookspecs import hookimpl

                                 @hookimpl
                                 def meliad_register_memory_stores(register):
                                     register("shadow_store", object())
                                 '''})


@pytest.fixture
def manager_with(monkeypatch):
    """Puts distribution folders on sys.path and returns a freshly loaded, process-wide manager."""

    def load(*dirs: Path) -> plugins.PluginManager:
        for folder in dirs:
            monkeypatch.syspath_prepend(str(folder))
        manager = plugins.load_plugin_manager()
        plugins.set_plugin_manager(manager)
        return manager

    yield load
    plugins.set_plugin_manager(None)


def builtin_entry_points() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return project["entry-points"]["meliad"]


# ----------------------------------------------------------------------------------------------
# built-ins


def test_builtin_entry_points_are_discovered(manager_with):
    manager = manager_with()
    version = importlib.metadata.version("meliad")
    for name in builtin_entry_points():
        assert manager.origins.get(name) == ("meliad", version), f"built-in plugin {name!r} not loaded"
    assert not [f for f in manager.failures if f.distribution == "meliad"]


def test_builtin_strategies_are_registered_by_meliad(manager_with):
    manager = manager_with()
    entries = manager.entries()
    assert entries, "the built-in plugins register nothing"
    for entry in entries:
        assert entry.distribution == "meliad" and entry.plugin in {*builtin_entry_points(), "core"}
    assert manager.get("attention_kernel", "reference").plugin == "core"  # registered by core itself


def test_disabling_every_plugin_leaves_the_reference_kernel(manager_with, monkeypatch):
    monkeypatch.setenv("MELIAD_DISABLE_PLUGINS", ",".join(builtin_entry_points()))
    manager = manager_with()
    assert manager.names("attention_kernel") == ["reference"]
    assert assemble.attention_kernel("auto", backend="jax").name == "reference"


def test_unknown_name_lists_known_ones(manager_with, example_dir):
    manager = manager_with(example_dir)
    known = manager.names("memory_store")
    assert "example_recent" in known
    with pytest.raises(plugins.PluginError) as info:
        assemble.resolve("memory_store", "no_such_store")
    assert str(info.value) == f"unknown memory store 'no_such_store'; known: {', '.join(known)}"
    with pytest.raises(plugins.PluginError, match="unknown plugin kind 'memory'; known kinds: attention_kernel"):
        manager.registry("memory")


def test_disable_plugins_by_entry_point_name(manager_with, example_dir, monkeypatch):
    monkeypatch.setenv("MELIAD_DISABLE_PLUGINS", " example_memory , positions")
    manager = manager_with(example_dir)
    assert "example_memory" not in manager.origins and "positions" not in manager.origins
    assert "example_recent" not in manager.names("memory_store")
    assert manager.names("position_bias") == []
    assert "memory" in manager.origins  # the others still load
    assert not manager.failures


def test_duplicate_names_keep_the_first_and_report_the_second(manager_with, shadow_dir):
    manager = manager_with(shadow_dir)
    assert manager.origins["memory"][0] == "meliad"  # the built-in keeps its entry-point name
    assert "shadow_store" not in manager.names("memory_store")
    assert any(f.plugin == "memory" and f.distribution == "meliad-shadow" and "already used by meliad" in f.error
               for f in manager.failures)

    class Copycat:
        @hookimpl
        def meliad_register_memory_stores(self, register):
            register("exact", object())
            register("copycat_store", object())

    manager = plugins.load_plugin_manager(extra_plugins=[("copycat", Copycat())])
    assert manager.get("memory_store", "exact").distribution == "meliad"
    assert manager.get("memory_store", "copycat_store").plugin == "copycat"
    assert any(f.plugin == "copycat" and "'exact' is already registered by memory" in f.error
               for f in manager.failures)


# ----------------------------------------------------------------------------------------------
# broken third-party plugins


def test_broken_plugins_are_reported_and_the_rest_still_load(manager_with, broken_dir, example_dir):
    manager = manager_with(broken_dir, example_dir)
    failures = {f.plugin: f for f in manager.failures}
    assert failures["broken_import"].distribution == "meliad-broken-import"
    assert failures["broken_import"].stage == "import"
    assert failures["broken_import"].error == "ImportError: broken on purpose at import"
    assert "broken_import" not in manager.origins
    # the broken hook is only called when its registry is first used
    assert "broken_hook" not in failures and manager.origins["broken_hook"] == ("meliad-broken-hook", "1.1")
    stores = manager.names("memory_store")
    failures = {f.plugin: f for f in manager.failures}
    assert (failures["broken_hook"].distribution, failures["broken_hook"].stage, failures["broken_hook"].error) == (
        "meliad-broken-hook", "meliad_register_memory_stores", "RuntimeError: broken on purpose in the hook")
    assert {"example_recent", "bucketed"} <= set(stores)
    assert set(builtin_entry_points()) <= set(manager.origins)


def test_a_broken_plugin_can_be_disabled(manager_with, broken_dir, monkeypatch):
    monkeypatch.setenv("MELIAD_DISABLE_PLUGINS", "broken_import,broken_hook")
    manager = manager_with(broken_dir)
    manager.entries()
    assert not manager.failures


def test_broken_recipe_dirs_and_command_hooks_are_reported(manager_with):
    class Broken:
        @hookimpl
        def meliad_recipe_dirs(self):
            raise OSError("no recipes here")

        @hookimpl
        def meliad_register_commands(self, cli):
            cli.commands["run"] = "not the real run"

    manager = plugins.load_plugin_manager(extra_plugins=[("broken", Broken())])
    assert manager.recipe_dirs() == [] and manager.recipe_dirs() == []
    assert [(f.plugin, f.stage, f.error) for f in manager.failures] == [
        ("broken", "meliad_recipe_dirs", "OSError: no recipes here")]  # reported once

    class Group:
        commands = {"run": "the real run"}

    group = Group()
    manager.add_commands(group)
    assert group.commands["run"] == "the real run"
    assert "tried to replace the command 'run'" in manager.failures[-1].error


# ----------------------------------------------------------------------------------------------
# the third-party example plugin


def test_third_party_plugin_is_found_with_its_distribution(manager_with, example_dir):
    project = example_project()
    manager = manager_with(example_dir)
    assert manager.origins["example_memory"] == (project["name"], project["version"]) == (
        "meliad-example-memory", "0.3.0")
    entry = manager.get("memory_store", "example_recent")
    assert (entry.distribution, entry.version, entry.plugin, entry.backends) == (
        "meliad-example-memory", "0.3.0", "example_memory", None)
    store = assemble.resolve("memory_store", "example_recent", backend=os.environ.get("KERAS_BACKEND"))
    assert type(store).__name__ == "RecentStore" and store is entry.obj
    assert importlib.import_module("meliad_example_memory").__file__.startswith(str(example_dir))


def test_third_party_recipe_dir_and_store_in_a_recipe(manager_with, example_dir, tmp_path):
    manager_with(example_dir)
    assert example_dir / "meliad_example_memory" / "recipes" in recipes.recipe_search_dirs()
    assert "example_recent_memory" in [name for name, _, _ in recipes.list_recipes()]
    mine = tmp_path / "mine.yaml"
    mine.write_text("include: [sizes/tiny_test, example_recent_memory]\nattention: {window: 256}\n"
                    "model: {position_bias: none}\n")
    recipe = recipes.load_recipe(mine, check_plugins=False)
    assert recipe.memory.store == "example_recent" and recipe.memory_layers == (1,)
    assemble.check_recipe(recipe)  # example_recent, none, synthetic and bytes are all installed


def test_third_party_store_declares_and_validates_its_own_option(manager_with, example_dir, tmp_path):
    manager_with(example_dir)
    base = "include: [sizes/tiny_test, example_recent_memory]\nattention: {window: 256}\n"
    cases = {
        "memory: {options: {newest_first: maybe}}": "memory.options.newest_first: got 'maybe', expected true or false",
        "memory: {options: {newest: false}}": "memory.options.newest: unknown option of memory store "
                                              "'example_recent'; did you mean 'memory.options.newest_first'? "
                                              "(its options: newest_first)",
        "memory: {store: exact, options: {newest_first: false}}": "memory.options.newest_first: unknown option of "
                                                                   "memory store 'exact' (its options: none)",
    }
    for i, (extra, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(base + extra + "\n")
        with pytest.raises(recipes.RecipeError) as info:
            recipes.load_recipe(path)
        assert str(info.value) == message
    good = tmp_path / "good.yaml"
    good.write_text(base + "memory: {options: {newest_first: false}}\n")
    recipe = recipes.load_recipe(good)
    assert recipe.memory.options == {"newest_first": False}
    store = assemble.memory_store("example_recent", recipe.memory.options, backend="jax")
    assert store.newest_first is False
    assert assemble.memory_store("example_recent", {}, backend="jax").newest_first is True  # the default


def numpy_recent(key_db, filled, num_neighbors, num_queries):
    """Reference for example_recent: the highest filled slots, newest first, zero-padded."""
    batch, heads, _, dim = key_db.shape
    out = np.zeros((batch, heads, num_queries, num_neighbors, dim), key_db.dtype)
    for b in range(batch):
        slots = np.flatnonzero(filled[b])[::-1][:num_neighbors]
        for j, slot in enumerate(slots):
            out[b, :, :, j] = key_db[b, :, slot][:, None, :]
    return out


def test_example_recent_store_retrieves_the_newest_filled_slots(manager_with, example_dir):
    manager_with(example_dir)
    keras = pytest.importorskip("keras")
    store = assemble.resolve("memory_store", "example_recent")
    rng = np.random.default_rng(0)
    batch, heads, size, dim, num_queries, k = 3, 2, 8, 4, 5, 4
    key_db = rng.normal(size=(batch, heads, size, dim)).astype("float32")
    value_db = rng.normal(size=(batch, heads, size, dim)).astype("float32")
    filled = np.zeros((batch, size), bool)
    filled[0, :2] = True  # fewer filled slots than neighbours: zeros after them
    filled[1, :] = True  # full memory
    filled[2, [0, 3, 4, 6, 7]] = True
    queries = rng.normal(size=(batch, heads, num_queries, dim)).astype("float32")
    keys, values = store.retrieve(keras.ops.convert_to_tensor(key_db), keras.ops.convert_to_tensor(value_db),
                                  keras.ops.convert_to_tensor(filled), keras.ops.convert_to_tensor(queries),
                                  num_neighbors=k, query_chunk=0)
    keys, values = keras.ops.convert_to_numpy(keys), keras.ops.convert_to_numpy(values)
    assert keys.shape == values.shape == (batch, heads, num_queries, k, dim)
    np.testing.assert_allclose(keys, numpy_recent(key_db, filled, k, num_queries), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(values, numpy_recent(value_db, filled, k, num_queries), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(keys[1, :, 0, 0], key_db[1, :, 7])  # newest first
    assert not keys[0, :, :, 2:].any()
