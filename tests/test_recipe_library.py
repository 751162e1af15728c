"""The bundled recipe library (recipes/): every file loads, the numbers match meliad's gin files (spec
§5.7, §7.1, §8.4, §9.4, §10.2), pieces compose, each paper run has a CPU twin, and the twins train."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import keras
import pytest
import yaml

from meliad_core import recipes

RECIPES_DIR = recipes.bundled_recipes_dir()
DOCS = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"

ALL = sorted(path.relative_to(RECIPES_DIR).with_suffix("").as_posix() for path in RECIPES_DIR.rglob("*.yaml"))
PIECE_FOLDERS = ("sizes", "options", "recurrent", "tasks")
PAPER_RUNS = ("transformer_xl", "memorizing", "block_recurrent")
# files that mirror a meliad gin file (or a combination of them) and must say which
MIRRORS = [name for name in ALL if name.split("/")[0] in PIECE_FOLDERS] + [
    "base", "trainer", *PAPER_RUNS, *(f"{run}_tiny" for run in PAPER_RUNS)]

TRAIN_OVERRIDES = ["train.steps=2", "eval.steps=1", "eval.every=2", "train.checkpoint_every=2"]


pytestmark = pytest.mark.usefixtures("installed_plugins")


def load(name: str, overrides=()):
    return recipes.load_recipe(name, list(overrides))


def compose(tmp_path: Path, *includes: str, **sections):
    """Loads a throwaway recipe that includes `includes` in order, then `sections`."""
    path = tmp_path / "composed.yaml"
    path.write_text(yaml.safe_dump({"include": list(includes), **sections}), encoding="utf-8")
    return recipes.load_recipe(path)


def sizes(recipe) -> tuple:
    m = recipe.model
    return m.num_layers, m.embed_dim, m.num_heads, m.head_dim, m.mlp_dim


# ----------------------------------------------------------------------------------------------
# Every file


def test_the_library_is_there():
    expected = {
        "base", "trainer", *PAPER_RUNS, *(f"{run}_tiny" for run in PAPER_RUNS),
        *(f"sizes/{s}" for s in ("tiny_test", "small_test", "small", "small_37M", "small_75M", "medium_150M",
                                 "medium_300M", "large_600M", "large_1200M", "layer13", "layer24", "layer26")),
        *(f"options/{o}" for o in ("positions_t5", "positions_none", "positions_absolute", "seq_512", "seq_1024", "seq_2048", "seq_4096",
                                   "seq_512_nocache", "seq_1024_nocache", "seq_2048_nocache", "lr_cosine_decay",
                                   "lr_rsqrt_decay", "lr_rsqrt_decay_std", "lr_linear_decay",
                                   "lr_cosine_decay_spike", "lr_max_steps_125k", "lr_max_steps_250k",
                                   "lr_max_steps_500k", "lr_scale_05", "lr_scale_2", "external_memory_8k",
                                   "external_memory_32k", "external_memory_64k", "stack_window_512")),
        *(f"options/window_{w}" for w in (128, 256, 512, 1024, 2048)),
        *(f"recurrent/{g}_{v}" for g in ("bias", "lstm") for v in ("skip", "single", "dual")),
        *(f"recurrent/states_{s}" for s in (128, 256, 512, 1024, 2048)),
        "recurrent/block_feedback_512", "recurrent/tall_24L",
        "tasks/synthetic", "tasks/pg19_bytes", "tasks/pg19_tokens",
    }
    assert expected <= set(ALL), sorted(expected - set(ALL))


@pytest.mark.parametrize("name", ALL)
def test_each_recipe_resolves_validates_and_names_installed_plugins(name):
    recipe = load(name)
    own = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    assert own["name"] == name.split("/")[-1] == recipe.name
    description = own["description"]
    assert isinstance(description, str) and description.strip() and "\n" not in description.strip()


@pytest.mark.parametrize("name", MIRRORS)
def test_each_mirror_names_its_meliad_origin(name):
    text = (RECIPES_DIR / f"{name}.yaml").read_text(encoding="utf-8")
    assert re.search(r"^# meliad: \S", text, re.MULTILINE), f"{name}: needs a '# meliad: <gin file>' comment"


@pytest.mark.skipif(not DOCS.is_file(), reason="docs/recipes.md is not in this checkout")
def test_docs_mention_every_recipe():
    text = DOCS.read_text(encoding="utf-8")
    missing = [name for name in ALL if f"`{name}`" not in text]
    assert not missing, f"docs/recipes.md does not mention {missing}"


# ----------------------------------------------------------------------------------------------
# Numbers against the spec


def test_sizes_match_spec_5_7():
    table = {
        "small": (6, 512, 8, 128, 2048), "small_37M": (12, 512, 8, 64, 2048), "small_75M": (12, 512, 8, 128, 4096),
        "medium_150M": (12, 1024, 8, 128, 4096), "medium_300M": (12, 1024, 16, 128, 8192),
        "large_600M": (12, 2048, 16, 128, 8192), "large_1200M": (12, 2048, 32, 128, 16384),
        "tiny_test": (2, 128, 4, 32, 256), "small_test": (6, 512, 8, 128, 2048),
    }
    for name, expected in table.items():
        recipe = load(f"sizes/{name}")
        assert sizes(recipe) == expected, name
    medium = load("sizes/medium_150M")
    assert (medium.model.dropout, medium.data.segment_length, medium.data.batch_size, medium.attention.window) == (
        0.05, 512, 8, 512)  # the rest is base_htrans
    small_test = load("sizes/small_test")
    assert (small_test.data.segment_length, small_test.data.batch_size, small_test.attention.window) == (512, 2, 256)
    assert (small_test.train.steps, small_test.eval.every, small_test.train.checkpoint_every) == (10000, 50, 200)
    assert small_test.recurrence is None  # small_test.gin leaves recurrent_layer_indices empty


def test_layer_pieces_override_the_layer_count_only(tmp_path):
    for n in (13, 24, 26):
        assert yaml.safe_load((RECIPES_DIR / f"sizes/layer{n}.yaml").read_text())["model"] == {"num_layers": n}
        recipe = compose(tmp_path, "sizes/medium_150M", f"sizes/layer{n}")
        assert sizes(recipe) == (n, 1024, 8, 128, 4096)


def test_trainer_defaults_match_trainer_configuration():
    t = load("trainer").train
    assert (t.steps, t.optimizer, t.warmup, t.checkpoint_every, t.log_every) == (250000, "adafactor", 1000, 5000, 1000)
    assert (t.learning_rate.schedule, t.learning_rate.max, t.learning_rate.min) == ("cosine", 0.01, 0.001)
    assert t.learning_rate.max_steps is None and t.learning_rate.multiplier == 1.0
    assert (load("trainer").eval.every, load("trainer").eval.steps) == (1000, 400)


def test_sequence_options_keep_4096_tokens_per_batch(tmp_path):
    for n, b in ((512, 8), (1024, 4), (2048, 2), (4096, 1)):
        recipe = compose(tmp_path, "base", f"options/seq_{n}")
        assert (recipe.data.segment_length, recipe.data.batch_size, recipe.attention.xl_cache) == (n, b, True)
        assert recipe.attention.window == 512  # seq_* leaves the window alone
    for n, b in ((512, 8), (1024, 4), (2048, 2)):
        recipe = load(f"options/seq_{n}_nocache")
        assert (recipe.data.segment_length, recipe.data.batch_size) == (n, b)
        assert (recipe.attention.window, recipe.attention.xl_cache) == (n, False)


def test_windows_compose_with_sequence_options(tmp_path):
    for w in (128, 256, 512):
        recipe = compose(tmp_path, "base", "options/seq_4096", f"options/window_{w}")
        assert (recipe.data.segment_length, recipe.attention.window) == (4096, w)
    for w in (1024, 2048):
        after = compose(tmp_path, "base", "options/seq_4096", f"options/window_{w}")
        assert (after.data.segment_length, after.data.batch_size, after.attention.window) == (4096, 1, w)
        before = compose(tmp_path, "base", f"options/window_{w}", "options/seq_2048")
        assert (before.data.segment_length, before.data.batch_size, before.attention.window) == (2048, 2, w)
    assert load("options/stack_window_512").attention.window == 512


def test_memory_options_match_spec_7_1(tmp_path):
    for k, size in ((8, 8192), (32, 32768), (64, 65536)):
        recipe = load(f"options/external_memory_{k}k")
        mem = recipe.memory
        assert (mem.layers, mem.size, mem.neighbors, mem.store) == ((-4,), size, 128, "bucketed")
        assert recipe.memory_layers == (8,)  # layer 9 of 12, the paper's
        assert (recipe.train.log_every, recipe.train.checkpoint_every) == (100, 1000)
    # meliad advises against a memory with a sliding window (the segment's earlier windows are then in
    # neither the memory nor the window, spec 7.1) but does not forbid it, nor do we (the demos use it;
    # tests/test_memory_window.py pins what a token sees)
    after = compose(tmp_path, "base", "options/seq_4096", "options/external_memory_32k")
    assert (after.data.segment_length, after.attention.window, after.memory.size) == (4096, 512, 32768)


def test_gate_configs_match_spec_8_4():
    table = {"bias_skip": ("fixed", "skip"), "bias_single": ("fixed", "single"), "bias_dual": ("fixed", "dual"),
             "lstm_skip": ("lstm", "skip"), "lstm_single": ("lstm", "single"), "lstm_dual": ("lstm", "dual")}
    for name, (gate, variant) in table.items():
        recipe = load(f"recurrent/{name}")
        rec = recipe.recurrence
        assert (rec.gate, rec.variant, rec.layers, rec.num_states, rec.feedback) == (gate, variant, (-3,), 512, False)
        assert recipe.attention.window == 512 and recipe.recurrent_layers == (9,)  # layer 10 of 12


def test_recurrent_options(tmp_path):
    for s in (128, 256, 512, 1024, 2048):
        rec = compose(tmp_path, "base", "recurrent/lstm_dual", f"recurrent/states_{s}").recurrence
        assert (rec.num_states, rec.gate, rec.variant) == (s, "lstm", "dual")
    tall = compose(tmp_path, "sizes/medium_150M", "recurrent/bias_skip", "recurrent/tall_24L")
    assert tall.model.num_layers == 24 and tall.recurrence.layers == (9, 19) and tall.recurrent_layers == (9, 19)
    feedback = compose(tmp_path, "base", "options/seq_4096", "recurrent/bias_skip", "recurrent/block_feedback_512")
    assert feedback.recurrence.feedback and feedback.attention.window == 512
    assert (feedback.recurrence.gate, feedback.recurrence.variant) == ("fixed", "skip")


def test_learning_rate_options_match_spec_10_2(tmp_path):
    def lr(*names):
        return compose(tmp_path, "base", *names).train.learning_rate

    assert (lr("options/lr_rsqrt_decay").schedule, lr("options/lr_rsqrt_decay").max) == ("rsqrt", 0.05)
    assert lr("options/lr_rsqrt_decay_std").schedule == "rsqrt_std"
    assert (lr("options/lr_linear_decay").schedule, lr("options/lr_linear_decay").min) == ("linear", 0.001)
    spike = lr("options/lr_cosine_decay_spike")
    assert (spike.schedule, spike.spike_steps, spike.spike_lr) == ("cosine", 10000, 0.04)
    back = lr("options/lr_cosine_decay_spike", "options/lr_cosine_decay")
    assert (back.schedule, back.max, back.min, back.spike_steps) == ("cosine", 0.01, 0.001, 0)
    for k in (125, 250, 500):
        assert lr(f"options/lr_max_steps_{k}k").max_steps == k * 1000
    assert lr("options/lr_scale_05").multiplier == 0.5 and lr("options/lr_scale_2").multiplier == 2.0


def test_tasks_match_spec_9_4():
    synthetic = load("tasks/synthetic")
    assert (synthetic.data.source, synthetic.data.vocabulary, synthetic.model.vocab_size) == ("synthetic", "bytes",
                                                                                               None)
    pg19_bytes = load("tasks/pg19_bytes")
    assert (pg19_bytes.data.source, pg19_bytes.data.vocabulary) == ("tfds", "bytes")
    assert pg19_bytes.model.vocab_size == 260 and pg19_bytes.train.steps == 500000
    assert (pg19_bytes.data.options["name"], pg19_bytes.data.options["feature"]) == ("pg19", "book_text")
    pg19_tokens = load("tasks/pg19_tokens")
    assert (pg19_tokens.data.source, pg19_tokens.data.vocabulary) == ("tfds", "sentencepiece")
    assert pg19_tokens.model.vocab_size == 32128 and pg19_tokens.train.steps == 500000
    assert pg19_tokens.data.options["vocabulary_path"].endswith(".model")
    # the placeholder is replaced from the command line
    moved = load("tasks/pg19_tokens", ["data.options.vocabulary_path=/data/spm/cc_all.32000.model"])
    assert moved.data.options["vocabulary_path"] == "/data/spm/cc_all.32000.model"


# ----------------------------------------------------------------------------------------------
# The paper runs and their twins


def test_paper_runs_are_the_readme_commands(tmp_path):
    xl = load("transformer_xl")
    assert sizes(xl) == (12, 1024, 8, 128, 4096) and xl.model.position_bias == "t5"
    assert (xl.data.segment_length, xl.data.batch_size, xl.attention.window, xl.attention.xl_cache) == (
        4096, 1, 512, True)
    assert xl.memory is None and xl.recurrence is None

    mt = load("memorizing")
    assert sizes(mt) == (12, 1024, 8, 128, 4096)
    assert (mt.data.segment_length, mt.data.batch_size, mt.attention.window) == (512, 8, 512)
    assert (mt.memory.size, mt.memory.neighbors, mt.memory_layers) == (32768, 128, (8,))
    assert mt.recurrence is None

    brt = load("block_recurrent")
    assert sizes(brt) == (12, 1024, 8, 128, 4096)
    assert (brt.data.segment_length, brt.data.batch_size, brt.attention.window) == (4096, 1, 512)
    assert (brt.recurrence.gate, brt.recurrence.variant, brt.recurrence.num_states) == ("fixed", "skip", 512)
    assert brt.recurrent_layers == (9,) and brt.memory is None

    for run, pieces in (("transformer_xl", ["options/positions_t5", "options/seq_4096"]),
                        ("memorizing", ["options/positions_t5", "options/seq_512", "options/external_memory_32k"]),
                        ("block_recurrent", ["options/positions_t5", "options/seq_4096", "recurrent/bias_skip"])):
        recipe = load(run)
        assert (recipe.data.source, recipe.data.vocabulary) == ("synthetic", "bytes")
        assert (recipe.train.optimizer, recipe.train.learning_rate.schedule) == ("adafactor", "cosine")
        assert (recipe.train.steps, recipe.train.warmup) == (250000, 1000)
        built = compose(tmp_path, "base", "sizes/medium_150M", "trainer", *pieces, name=run, description=recipe.description)
        assert built == recipe, run
        on_pg19 = compose(tmp_path, run, "tasks/pg19_bytes")
        assert (on_pg19.data.source, on_pg19.model.vocab_size, on_pg19.train.steps) == ("tfds", 260, 500000)


@pytest.mark.parametrize("run", PAPER_RUNS)
def test_each_paper_run_has_a_tiny_twin_with_the_same_architecture(run):
    paper, tiny = load(run), load(f"{run}_tiny")
    assert (paper.memory is None) == (tiny.memory is None)
    assert (paper.recurrence is None) == (tiny.recurrence is None)
    assert (tiny.model.position_bias, tiny.attention.xl_cache) == (paper.model.position_bias, paper.attention.xl_cache)
    assert (tiny.attention.window < tiny.data.segment_length) == (paper.attention.window < paper.data.segment_length)
    if paper.memory:
        assert tiny.memory.store == paper.memory.store
    if paper.recurrence:
        for key in ("gate", "variant", "feedback"):
            assert getattr(tiny.recurrence, key) == getattr(paper.recurrence, key), key
    assert (tiny.data.source, tiny.data.vocabulary) == (paper.data.source, paper.data.vocabulary)
    assert (tiny.train.optimizer, tiny.train.learning_rate) == (paper.train.optimizer, paper.train.learning_rate)
    # small enough for a CPU
    assert tiny.model.embed_dim == 128 and tiny.model.num_layers <= 3 and tiny.data.segment_length <= 256
    assert (tiny.train.steps, tiny.train.warmup, tiny.model.dropout) == (1000, 100, 0.1)
    assert tiny.data.options["num_documents"] <= 128


@pytest.mark.parametrize("run", [f"{run}_tiny" for run in PAPER_RUNS])
def test_each_tiny_recipe_trains(run, tmp_path):
    from meliad_core.runner import run_training

    recipe = recipes.load_recipe(run, TRAIN_OVERRIDES, backend=keras.backend.backend())
    with open(tmp_path / "out.txt", "w", encoding="utf-8") as out:
        run_training(recipe, tmp_path, out=out)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    splits = {r["split"] for r in records}
    assert {"train", "eval"} <= splits
    for record in records:
        assert math.isfinite(record["bits_per_token"]) and record["bits_per_token"] > 0, record
    assert max(r["step"] for r in records) == 2
