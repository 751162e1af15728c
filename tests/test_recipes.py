"""Recipe loading: includes, merging, overrides, validation messages and plugin-name checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from meliad_core import assemble, plugins, recipes
from meliad_core.config import RecipeError, validate_recipe
from meliad_core.hookspecs import hookimpl


class FakePlugin:
    """In-process plugin with names no real plugin uses, so recipes pass the plugin checks."""

    def __init__(self, recipe_dir: Path | None = None):
        self.recipe_dir = recipe_dir

    @hookimpl
    def meliad_register_position_biases(self, register):
        register("fake_bias", object())

    @hookimpl
    def meliad_register_attention_kernels(self, register):
        register("fake_kernel", object())
        register("fake_elsewhere_kernel", object(), backends=["no_such_backend"])
        register("fake_broken_kernel", object(), available=lambda: "needs a device this machine lacks")

    @hookimpl
    def meliad_register_memory_stores(self, register):
        register("fake_store", object())
        register("fake_store_2", object())

    @hookimpl
    def meliad_register_recurrence_gates(self, register):
        register("fake_gate", object())

    @hookimpl
    def meliad_register_data_sources(self, register):
        register("fake_source", object())

    @hookimpl
    def meliad_register_vocabularies(self, register):
        register("fake_vocab", object())

    @hookimpl
    def meliad_recipe_dirs(self):
        return [self.recipe_dir] if self.recipe_dir else []


class FailingPlugin:
    @hookimpl
    def meliad_register_memory_stores(self, register):
        raise RuntimeError("cannot register")


@pytest.fixture(autouse=True)
def fakes():
    """Every test sees the fake plugin (plus whatever is installed); restored afterwards."""
    manager = plugins.load_plugin_manager(extra_plugins=[("fakes", FakePlugin())])
    plugins.set_plugin_manager(manager)
    yield manager
    plugins.set_plugin_manager(None)


FAKE_BASE = {
    "model": {"num_layers": 2, "embed_dim": 16, "num_heads": 2, "head_dim": 8, "mlp_dim": 32,
              "position_bias": "fake_bias"},
    "attention": {"window": 8},
    "data": {"source": "fake_source", "vocabulary": "fake_vocab", "segment_length": 16, "batch_size": 2},
}


def write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def error_of(func, *args, **kwargs) -> str:
    """The message of the RecipeError that func raises; it must be a single line."""
    with pytest.raises(RecipeError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------
# include, merge, override


def test_includes_merge_in_order_then_own_keys_then_overrides(tmp_path):
    write(tmp_path / "a.yaml", {"model": {"num_layers": 4, "head_dim": 8, "embed_dim": 32}, "train": {"steps": 5}})
    write(tmp_path / "b.yaml", {"model": {"num_layers": 6}, "data": {"batch_size": 3}})
    top = write(tmp_path / "top.yaml", {"include": ["a", "b.yaml"], "model": {"embed_dim": 64}})
    merged = recipes.resolve_recipe_mapping(top)
    assert merged["model"] == {"num_layers": 6, "head_dim": 8, "embed_dim": 64}  # b over a, own over both
    assert merged["train"] == {"steps": 5}
    assert merged["data"] == {"batch_size": 3}
    assert "include" not in merged
    overridden = recipes.resolve_recipe_mapping(top, ["model.embed_dim=128", "model.num_layers=3",
                                                      "model.num_layers=2"])
    assert overridden["model"] == {"num_layers": 2, "head_dim": 8, "embed_dim": 128}  # last --set wins


def test_own_keys_replace_non_mappings_and_null_switches_a_section_off(tmp_path):
    write(tmp_path / "mem.yaml", {"memory": {"store": "fake_store", "layers": [-1, -2]}})
    top = write(tmp_path / "top.yaml", {"include": "mem", "memory": {"layers": [0]}})
    assert recipes.resolve_recipe_mapping(top)["memory"] == {"store": "fake_store", "layers": [0]}
    off = write(tmp_path / "off.yaml", {"include": "mem", "memory": None})
    assert recipes.resolve_recipe_mapping(off)["memory"] is None


def test_include_by_relative_path(tmp_path):
    write(tmp_path / "common" / "size.yaml", {"model": {"num_layers": 7}})
    top = write(tmp_path / "runs" / "x.yaml", {"include": "../common/size.yaml"})
    assert recipes.resolve_recipe_mapping(top)["model"]["num_layers"] == 7


@pytest.mark.parametrize("name", ["sizes/tiny_test", "sizes/tiny_test.yaml"])
def test_include_by_bundled_name(tmp_path, name):
    top = write(tmp_path / "mine.yaml", {"include": name, "train": {"steps": 3}})
    merged = recipes.resolve_recipe_mapping(top)
    assert merged["model"]["num_layers"] == 2 and merged["attention"]["window"] == 128
    assert merged["model"]["position_bias"] == "t5"  # from base.yaml, which tiny_test includes
    assert merged["train"] == {"steps": 3, "warmup": 100}
    # name and description describe one file: not inherited; a missing name is the file's stem
    assert merged["name"] == "mine"
    assert "description" not in merged


def test_a_file_next_to_the_includer_wins_over_a_bundled_one(tmp_path):
    write(tmp_path / "base.yaml", {"model": {"num_layers": 5}})
    top = write(tmp_path / "top.yaml", {"include": "base"})
    assert recipes.resolve_recipe_mapping(top)["model"] == {"num_layers": 5}


def test_include_from_a_plugin_recipe_dir(tmp_path):
    plugin_dir = tmp_path / "plugin_recipes"
    write(plugin_dir / "options" / "plugin_only.yaml", {"train": {"steps": 11}})
    manager = plugins.load_plugin_manager(extra_plugins=[("fakes", FakePlugin(plugin_dir))])
    plugins.set_plugin_manager(manager)
    top = write(tmp_path / "top.yaml", {"include": "options/plugin_only"})
    assert recipes.resolve_recipe_mapping(top)["train"] == {"steps": 11}
    assert ("options/plugin_only", plugin_dir / "options" / "plugin_only.yaml", "") in [
        (n, p, d) for n, p, d in recipes.list_recipes()]
    # a recipe named on the command line is looked up the same way
    assert recipes.resolve_recipe_mapping("options/plugin_only")["name"] == "plugin_only"


def test_include_cycle(tmp_path):
    write(tmp_path / "a.yaml", {"include": "b"})
    write(tmp_path / "b.yaml", {"include": "c.yaml"})
    write(tmp_path / "c.yaml", {"include": "a"})
    message = error_of(recipes.resolve_recipe_mapping, tmp_path / "a.yaml")
    assert "include cycle: a.yaml -> b.yaml -> c.yaml -> a.yaml" in message
    write(tmp_path / "self.yaml", {"include": "self"})
    assert "include cycle: self.yaml -> self.yaml" in error_of(recipes.resolve_recipe_mapping, tmp_path / "self.yaml")


def test_the_same_file_included_twice_is_not_a_cycle(tmp_path):
    write(tmp_path / "shared.yaml", {"model": {"num_layers": 3}})
    write(tmp_path / "left.yaml", {"include": "shared", "train": {"steps": 1}})
    write(tmp_path / "right.yaml", {"include": "shared", "eval": {"steps": 2}})
    top = write(tmp_path / "top.yaml", {"include": ["left", "right"]})
    merged = recipes.resolve_recipe_mapping(top)
    assert merged["model"] == {"num_layers": 3} and merged["train"] == {"steps": 1} and merged["eval"] == {"steps": 2}


def test_unknown_include(tmp_path):
    top = write(tmp_path / "top.yaml", {"include": ["no_such_recipe"]})
    message = error_of(recipes.resolve_recipe_mapping, top)
    assert str(top) in message and "include 'no_such_recipe': no such recipe" in message


def test_include_must_be_names(tmp_path):
    top = write(tmp_path / "top.yaml", "include: 5\n")
    assert "include: got 5, expected a recipe name or a list" in error_of(recipes.resolve_recipe_mapping, top)


def test_missing_recipe_file(tmp_path):
    message = error_of(recipes.load_recipe, tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "no such file" in message
    assert "no such file" in error_of(recipes.load_recipe, "not_a_bundled_recipe")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.yaml", "model:\n  num_layers: 2\n  embed_dim: [1, 2\ntrain:\n  steps: 3\n")
    message = error_of(recipes.resolve_recipe_mapping, bad)
    assert message.startswith(f"{bad}:")
    assert "invalid YAML" in message
    line = int(message[len(str(bad)) + 1:].split(":")[0])
    assert 3 <= line <= 4  # the unclosed list starts on line 3; the parser notices on line 4
    # an error in an included file names that file
    top = write(tmp_path / "top.yaml", {"include": "bad"})
    assert error_of(recipes.resolve_recipe_mapping, top).startswith(f"{bad}:")


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just text\n", "str"), ("3\n", "int")])
def test_document_must_be_a_mapping(tmp_path, text, kind):
    path = write(tmp_path / "r.yaml", text)
    assert f"got a {kind} document, expected a mapping" in error_of(recipes.resolve_recipe_mapping, path)


def test_only_safe_yaml(tmp_path):
    path = write(tmp_path / "r.yaml", "model: !!python/object/apply:os.system ['true']\n")
    assert "invalid YAML" in error_of(recipes.resolve_recipe_mapping, path)


def test_overrides_are_parsed_as_yaml_and_create_sections(tmp_path):
    top = write(tmp_path / "top.yaml", FAKE_BASE)
    recipe = recipes.load_recipe(top, [
        "train.steps=7", "model.dropout=0.25", "attention.xl_cache=false", "train.learning_rate.schedule=rsqrt",
        "memory.store=fake_store_2", "memory.layers=[-1]", "memory.size=64", "memory.neighbors=4",
        "attention.window=16", "name=renamed", "description=two words",
    ])
    assert recipe.train.steps == 7 and recipe.model.dropout == 0.25 and recipe.attention.xl_cache is False
    assert recipe.train.learning_rate.schedule == "rsqrt"
    assert recipe.memory.store == "fake_store_2" and recipe.memory.layers == (-1,) and recipe.memory_layers == (1,)
    assert recipe.name == "renamed" and recipe.description == "two words"
    assert recipes.load_recipe(top, ["memory=null"]).memory is None


@pytest.mark.parametrize("text, expected", [
    ("train.steps", "expected key=value"),
    ("=3", "expected key=value"),
    ("train..steps=3", "expected key=value"),
    ("train.steps =3", None),  # spaces around the key are trimmed
    ("train.steps=[1, 2", "invalid YAML value"),
    ("model.dropout.rate=1", "model.dropout is 0.05, not a mapping"),
    ("include=base", "include cannot be overridden"),
])
def test_override_syntax(tmp_path, text, expected):
    top = write(tmp_path / "top.yaml", {**FAKE_BASE, "model": {**FAKE_BASE["model"], "dropout": 0.05}})
    if expected is None:
        assert recipes.load_recipe(top, [text]).train.steps == 3
        return
    message = error_of(recipes.load_recipe, top, [text])
    assert message.startswith(f"--set {text!r}") and expected in message


def test_override_type_errors_come_from_validation(tmp_path):
    top = write(tmp_path / "top.yaml", FAKE_BASE)
    assert error_of(recipes.load_recipe, top, ["train.steps=lots"]) == \
        "train.steps: got 'lots', expected an integer"


# ----------------------------------------------------------------------------------------------
# validation rules of config.py, through the loader


def with_changes(**sections) -> dict:
    recipe = {key: dict(value) for key, value in FAKE_BASE.items()}
    for section, values in sections.items():
        if not isinstance(values, dict):
            recipe[section] = values
        else:
            recipe.setdefault(section, {}).update(values)
    return recipe


MEMORY = {"store": "fake_store", "layers": [-1], "size": 64, "neighbors": 4}


@pytest.mark.parametrize("changes, message", [
    ({"model": {"num_layer": 3}}, "model.num_layer: unknown key; did you mean 'model.num_layers'?"),
    ({"modle": {}}, "modle: unknown key; did you mean 'model'?"),
    ({"model": {"num_layers": "two"}}, "model.num_layers: got 'two', expected an integer"),
    ({"model": {"num_layers": True}}, "model.num_layers: got True, expected an integer"),
    ({"model": {"dropout": "lots"}}, "model.dropout: got 'lots', expected a number"),
    ({"attention": {"xl_cache": "yes"}}, "attention.xl_cache: got 'yes', expected true or false"),
    ({"data": {"source": 3}}, "data.source: got 3, expected a string"),
    ({"memory": {**MEMORY, "layers": "last"}}, "memory.layers: got 'last', expected a list of integers"),
    ({"memory": {**MEMORY, "layers": [1.5]}}, "memory.layers[0]: got 1.5, expected an integer"),
    ({"model": 5}, "model: got 5, expected a mapping"),
    ({"model": {"logit_scale": "sqrt"}}, "model.logit_scale: got 'sqrt', expected one of sqrt_vocab, sqrt_embed, none"),
    ({"train": {"optimizer": "sgd"}}, "train.optimizer: got 'sgd', expected one of adafactor, adam"),
    ({"model": {"dropout": 1.0}}, "model.dropout: got 1.0, expected a rate in [0, 1)"),
    ({"model": {"num_heads": 0}}, "model.num_heads: got 0, expected a positive number"),
    ({"attention": {"window": 6}}, "data.segment_length: got 16, expected a multiple of attention.window (6)"),
    ({"attention": {"window": 32}}, "data.segment_length: got 16, expected a multiple of attention.window (32)"),
    ({"memory": {**MEMORY, "layers": [2]}},
     "memory.layers[0]: got 2, expected an index in [-2, 1] (model.num_layers is 2; negative counts from the top)"),
    ({"recurrence": {"gate": "fake_gate", "layers": [0, -3]}}, "recurrence.layers[1]: got -3, expected an index in [-2, 1]"),
    ({"memory": {**MEMORY, "layers": []}}, "memory.layers: got [], expected at least one layer index"),
    ({"memory": {**MEMORY, "size": 72, "neighbors": 8}},
     "memory.size: got 72, expected a multiple of the entries written per segment (16 = data.segment_length / "
     "memory.update_stride)"),
    ({"memory": {**MEMORY, "size": 48, "neighbors": 32}}, "memory.size: got 48, expected a multiple of memory.neighbors (32)"),
    ({"attention": {"window": 8, "xl_cache": False}},
     "attention.window: got 8, expected data.segment_length (16) when attention.xl_cache is false"),
    ({"memory": MEMORY, "recurrence": {"gate": "fake_gate", "layers": [1]}},
     "recurrence.layers: layer 1 is also a memory layer"),
])
def test_validation_rule(tmp_path, changes, message):
    if "memory" in changes and "attention" not in changes:
        changes = {**changes, "attention": {"window": 16}}  # W = N, as meliad's memorizing recipes
    path = write(tmp_path / "r.yaml", with_changes(**changes))
    assert message in error_of(recipes.load_recipe, path)


@pytest.mark.parametrize("layers, resolved", [([-1], (1,)), ([-2, 1], (0, 1)), (-1, (1,)), ([0], (0,))])
def test_negative_and_scalar_layer_indices_are_fine(tmp_path, layers, resolved):
    path = write(tmp_path / "r.yaml", with_changes(memory={**MEMORY, "layers": layers}, attention={"window": 16}))
    assert recipes.load_recipe(path).memory_layers == resolved


def test_valid_memory_and_sliding_window_recipes(tmp_path):
    sliding = recipes.load_recipe(write(tmp_path / "s.yaml", with_changes(recurrence={"gate": "fake_gate",
                                                                                       "layers": [-1]})))
    assert sliding.attention.window == 8 and sliding.recurrent_layers == (1,)
    memory = recipes.load_recipe(write(tmp_path / "m.yaml", with_changes(memory=MEMORY, attention={"window": 16})))
    assert memory.memory.size == 64 and memory.memory_layers == (1,)


# ----------------------------------------------------------------------------------------------
# plugin names


@pytest.mark.parametrize("section, key, kind", [
    ("model", "position_bias", "position_bias"),
    ("attention", "kernel", "attention_kernel"),
    ("memory", "store", "memory_store"),
    ("recurrence", "gate", "recurrence_gate"),
    ("data", "source", "data_source"),
    ("data", "vocabulary", "vocabulary"),
])
def test_unknown_plugin_name_lists_the_known_ones(tmp_path, fakes, section, key, kind):
    changes = {"memory": MEMORY, "attention": {"window": 16}} if section == "memory" else {}
    if section == "recurrence":
        changes = {"recurrence": {"gate": "fake_gate", "layers": [0]}}
    recipe = with_changes(**changes)
    recipe[section] = {**recipe[section], key: "no_such_thing"}
    message = error_of(recipes.load_recipe, write(tmp_path / "r.yaml", recipe))
    assert message.startswith(f"{section}.{key}: got 'no_such_thing', expected one of the installed ")
    known = fakes.names(kind)
    assert known and all(name in message for name in known)
    assert recipes.load_recipe(write(tmp_path / "r.yaml", recipe), check_plugins=False)


def test_auto_kernel_and_absent_sections_are_not_checked(tmp_path):
    recipe = recipes.load_recipe(write(tmp_path / "r.yaml", with_changes(attention={"kernel": "auto"})))
    assert recipe.attention.kernel == "auto" and recipe.memory is None and recipe.recurrence is None
    assert recipes.load_recipe(write(tmp_path / "k.yaml", with_changes(attention={"kernel": "fake_kernel"})))


def test_plugin_availability_is_checked_for_a_backend(tmp_path):
    elsewhere = write(tmp_path / "e.yaml", with_changes(attention={"kernel": "fake_elsewhere_kernel"}))
    assert recipes.load_recipe(elsewhere).attention.kernel == "fake_elsewhere_kernel"  # no backend: names only
    message = error_of(recipes.load_recipe, elsewhere, backend="jax")
    assert message.startswith("attention.kernel: got 'fake_elsewhere_kernel'")
    assert "not available on the jax backend: serves no_such_backend only" in message
    broken = write(tmp_path / "b.yaml", with_changes(attention={"kernel": "fake_broken_kernel"}))
    assert "needs a device this machine lacks" in error_of(recipes.load_recipe, broken, backend="torch")


def test_unknown_name_mentions_plugins_that_failed(tmp_path):
    manager = plugins.load_plugin_manager(extra_plugins=[("fakes", FakePlugin()), ("failing", FailingPlugin())])
    plugins.set_plugin_manager(manager)
    recipe = with_changes(memory={**MEMORY, "store": "from_the_failing_plugin"}, attention={"window": 16})
    message = error_of(recipes.load_recipe, write(tmp_path / "r.yaml", recipe))
    assert "fake_store" in message and "failed to load, see 'meliad plugins'" in message


# ----------------------------------------------------------------------------------------------
# bundled recipes


def test_bundled_recipes_are_listed_with_descriptions():
    listed = {name: (path, description) for name, path, description in recipes.list_bundled_recipes()}
    assert {"base", "sizes/tiny_test"} <= set(listed)
    for name, (path, description) in listed.items():
        assert path.is_file() and path.parent.resolve().is_relative_to(recipes.bundled_recipes_dir())
        own = yaml.safe_load(path.read_text())
        assert own["name"] and own["description"], f"{name} needs a name and a description"
        assert description == own["description"].strip().splitlines()[0]


def test_every_bundled_recipe_validates():
    for name, _path, _description in recipes.list_bundled_recipes():
        recipe = recipes.load_recipe(name, check_plugins=False)
        assert recipe.name and recipe.description


def test_bundled_recipes_name_installed_plugins():
    """Skipped while a built-in registry a bundled recipe needs is still empty (being written)."""
    manager = plugins.load_plugin_manager()
    plugins.set_plugin_manager(manager)
    for name, _path, _description in recipes.list_bundled_recipes():
        recipe = recipes.load_recipe(name, check_plugins=False)
        for (section, key), (kind, _options) in assemble.PLUGIN_KEYS.items():
            config = getattr(recipe, section)
            value = config and getattr(config, key)
            if not value or (kind == "attention_kernel" and value == "auto"):
                continue
            if not manager.names(kind):
                pytest.skip(f"no built-in {kind} is registered yet")
            assert value in manager.names(kind), f"{name}: {section}.{key}={value!r} is not installed"


def test_tiny_test_and_base_sizes_match_the_spec():
    tiny = recipes.load_recipe("sizes/tiny_test", check_plugins=False)
    m = tiny.model
    assert (m.num_layers, m.embed_dim, m.num_heads, m.head_dim, m.mlp_dim) == (2, 128, 4, 32, 256)
    assert (m.dropout, m.attn_dropout) == (0.1, 0.1)
    assert (tiny.data.segment_length, tiny.data.batch_size, tiny.attention.window) == (256, 1, 128)
    assert (tiny.train.steps, tiny.train.warmup) == (1000, 100)
    base = recipes.load_recipe("base", check_plugins=False)
    m = base.model
    assert (m.num_layers, m.embed_dim, m.num_heads, m.head_dim, m.mlp_dim) == (12, 512, 8, 128, 2048)
    assert (m.dropout, m.attn_dropout, m.position_bias) == (0.05, 0.05, "t5")
    assert (base.data.segment_length, base.data.batch_size, base.attention.window) == (512, 8, 512)
    assert (base.data.source, base.data.vocabulary) == ("synthetic", "bytes")


def test_a_shown_recipe_loads_back_to_the_same_recipe(tmp_path):
    original = recipes.load_recipe("sizes/tiny_test", ["memory.store=fake_store", "memory.size=512",
                                                       "memory.neighbors=8", "memory.layers=[-1]",
                                                       "attention.window=256"], check_plugins=False)
    dumped = write(tmp_path / "dumped.yaml", yaml.safe_dump(original.to_dict(), sort_keys=False))
    assert recipes.load_recipe(dumped, check_plugins=False) == original
    assert validate_recipe(original.to_dict()) == original
