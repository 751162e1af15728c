"""The options that let the long-range mechanisms learn at small budgets (docs/long_range.md), and the
demo recipes that use them (recipes/demos/): meliad's behaviour stays the default."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

from meliad_core import plugins, recipes
from meliad_core.config import AdafactorConfig, RecipeError, TrainConfig
from meliad_core.optimizers import Adafactor, make_optimizer

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEMOS = sorted(p.stem for p in (RECIPES_DIR / "demos").glob("*.yaml"))
BOOKS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "books"


@pytest.fixture(autouse=True)
def default_plugins():
    plugins.set_plugin_manager(None)
    yield
    plugins.set_plugin_manager(None)


def one_step(param, grad, **kwargs):
    """The parameter after one Adafactor step (no momentum, lr 0.01)."""
    variable = keras.Variable(np.asarray(param, np.float32), dtype="float32")
    optimizer = Adafactor(learning_rate=0.01, beta1=None, **kwargs)
    optimizer.apply([ops.convert_to_tensor(np.asarray(grad, np.float32))], [variable])
    return ops.convert_to_numpy(variable.value)


# ----------------------------------------------------------------------------------------------
# train.adafactor.min_scale, small_size, small_lr_multiplier


def test_defaults_are_meliads():
    cfg = AdafactorConfig()
    assert (cfg.min_scale, cfg.small_size, cfg.small_lr_multiplier) == (1e-3, 0, 1.0)
    optimizer = make_optimizer(TrainConfig(steps=10, warmup=1))
    assert optimizer.epsilon2 == 1e-3 and optimizer.small_size == 0 and optimizer.small_lr_multiplier == 1.0
    assert optimizer.lr_multiplier((4,)) == 1.0 and optimizer.lr_multiplier(()) == 1.0


def test_a_zero_scalar_moves_lr_times_the_floor():
    """meliad's memory gate bias (zeros): the first step moves it lr·1e-3 (the sign of the gradient)."""
    after = one_step(np.zeros(4), np.ones(4))
    np.testing.assert_allclose(after, -0.01 * 1e-3, rtol=1e-5)


def test_min_scale_raises_the_floor():
    after = one_step(np.zeros(4), np.ones(4), epsilon2=0.1)
    np.testing.assert_allclose(after, -0.01 * 0.1, rtol=1e-5)
    # a parameter whose RMS is above the floor is unaffected
    big = np.full(4, 2.0)
    np.testing.assert_allclose(one_step(big, np.ones(4), epsilon2=0.1), one_step(big, np.ones(4)), rtol=1e-6)


def test_small_parameters_take_the_multiplier():
    after = one_step(np.zeros(4), np.ones(4), small_size=5, small_lr_multiplier=100.0)
    np.testing.assert_allclose(after, -0.01 * 100.0 * 1e-3, rtol=1e-5)
    # as large as small_size or larger: the plain step
    np.testing.assert_allclose(one_step(np.zeros(5), np.ones(5), small_size=5, small_lr_multiplier=100.0),
                               -0.01 * 1e-3, rtol=1e-5)
    optimizer = Adafactor(small_size=1000, small_lr_multiplier=10.0)
    assert optimizer.lr_multiplier((8,)) == 10.0 and optimizer.lr_multiplier((64, 16)) == 1.0
    assert optimizer.lr_multiplier((128, 128)) == 1.0


def test_options_reach_the_optimizer_and_serialize():
    recipe = recipes.load_recipe("transformer_xl_tiny", ["train.adafactor.min_scale=0.01",
                                                         "train.adafactor.small_size=1024",
                                                         "train.adafactor.small_lr_multiplier=30"])
    optimizer = make_optimizer(recipe.train)
    assert (optimizer.epsilon2, optimizer.small_size, optimizer.small_lr_multiplier) == (0.01, 1024, 30.0)
    config = optimizer.get_config()
    assert config["small_size"] == 1024 and config["small_lr_multiplier"] == 30.0
    clone = Adafactor.from_config(config)
    assert clone.small_size == 1024 and clone.epsilon2 == 0.01


@pytest.mark.parametrize("override, message", [
    ("train.adafactor.min_scale=0", "train.adafactor.min_scale: got 0"),
    ("train.adafactor.small_size=-1", "train.adafactor.small_size: got -1"),
    ("train.adafactor.small_lr_multiplier=0", "train.adafactor.small_lr_multiplier: got 0"),
    ("model.attention_scale_init=0", "model.attention_scale_init: got 0"),
])
def test_bad_values_stop_with_one_line(override, message):
    with pytest.raises(RecipeError, match=message):
        recipes.load_recipe("transformer_xl_tiny", [override])


def _tiny_memorizing(*extra):
    overrides = ["model.num_layers=1", "model.embed_dim=16", "model.num_heads=2", "model.head_dim=8",
                 "model.mlp_dim=32", "data.segment_length=16", "attention.window=16", "data.batch_size=2",
                 "memory.layers=[0]", "memory.size=64", "memory.neighbors=4", "memory.store=exact",
                 "model.dropout=0", "model.attn_dropout=0", "train.warmup=1", "train.steps=4", *extra]
    return recipes.load_recipe("memorizing_tiny", overrides)


def _gate_after_steps(recipe, steps=3):
    from meliad_core import build_model, data

    keras.utils.set_random_seed(0)
    model = build_model(recipe)
    model.compile(optimizer=make_optimizer(recipe.train))
    stream = data.stream(recipe)
    for _, batch in zip(range(steps), stream):
        model.train_on_batch(data.keras_inputs(batch))
    gates = [v for v in model.trainable_variables if "external_memory_bias" in v.path]
    assert len(gates) == 1, [v.path for v in model.trainable_variables]
    return ops.convert_to_numpy(gates[0].value)


def test_the_memory_gate_learns_faster_with_the_options():
    plain = _gate_after_steps(_tiny_memorizing())
    boosted = _gate_after_steps(_tiny_memorizing("train.adafactor.small_size=1024",
                                                 "train.adafactor.small_lr_multiplier=100"))
    floor = _gate_after_steps(_tiny_memorizing("train.adafactor.min_scale=0.1"))
    moved = lambda g: float(np.abs(g).max())  # noqa: E731  (initial bias 0)
    assert moved(plain) < 1e-4  # meliad: lr·1e-3 per step at most
    assert moved(boosted) > 20 * moved(plain) and moved(floor) > 20 * moved(plain)
    started = _gate_after_steps(_tiny_memorizing("memory.gate_init=-2", "memory.empty=mask"), steps=0)
    np.testing.assert_allclose(started, -2.0)


@pytest.mark.parametrize("name", ["memorizing_tiny", "block_recurrent_tiny"])
def test_attention_scale_init_sets_every_learned_scale(name):
    from meliad_core import build_model

    def scales(*extra):
        model = build_model(recipes.load_recipe(name, ["model.num_layers=2", *extra]))
        found = {v.path: ops.convert_to_numpy(v.value) for v in model.weights if "attention_scale" in v.path}
        assert found and len(found) >= 2, found  # every layer's (and the recurrent cell's) scales
        return found

    assert all(np.all(v == 1.0) for v in scales().values())  # meliad: ones
    assert all(np.all(v == 6.0) for v in scales("model.attention_scale_init=6").values())


# ----------------------------------------------------------------------------------------------
# The demo recipes


def test_there_are_demo_triples():
    for task in ("recall", "ledgers", "books"):
        assert {f"{task}_xl", f"{task}_memorizing", f"{task}_recurrent"} <= set(DEMOS), DEMOS


@pytest.mark.parametrize("task", ["recall", "ledgers", "books"])
def test_demo_triples_differ_only_in_the_mechanism(task):
    """Same size, data, steps, seed and optimizer; memory only in memorizing, recurrence only in recurrent.
    The recall and books triples share the window too (W < N, so the recurrent cell has several blocks per
    segment); the older ledgers triple gives its recurrent twin a shorter one."""
    loaded = {m: recipes.load_recipe(f"demos/{task}_{m}") for m in ("xl", "memorizing", "recurrent")}
    xl = loaded["xl"]
    for mechanism, recipe in loaded.items():
        assert recipe.model == xl.model and recipe.data == xl.data and recipe.train == xl.train
        assert recipe.eval == xl.eval
        assert dataclasses.replace(recipe.attention, window=xl.attention.window) == xl.attention
        assert recipe.attention.window <= xl.attention.window  # no mechanism sees further locally than XL
        if task != "ledgers":
            assert recipe.attention == xl.attention and xl.attention.window < xl.data.segment_length
        assert (recipe.memory is not None) == (mechanism == "memorizing")
        assert (recipe.recurrence is not None) == (mechanism == "recurrent")
    assert xl.eval.report_batches > 0


def test_faithful_recipes_keep_meliads_optimizer_and_memory():
    for name in ("memorizing", "memorizing_tiny", "block_recurrent_tiny", "transformer_xl_tiny", "quickstart"):
        recipe = recipes.load_recipe(name)
        assert recipe.train.adafactor == AdafactorConfig(), name
        if recipe.memory is not None:
            assert recipe.memory.gate_init == 0.0 and recipe.memory.empty == "zeros"


@pytest.mark.skipif(not BOOKS.is_dir(), reason="the books of ../shared/data/books are not in this checkout")
def test_books_demo_streams_the_books():
    from meliad_core import data

    recipe = recipes.load_recipe("demos/books_xl", [f"data.options.paths={BOOKS}/*.txt"])
    batch = next(iter(data.stream(recipe)))
    assert tuple(batch["tokens"].shape) == (recipe.data.batch_size, recipe.data.segment_length)


VOCAB_4000 = BOOKS.parent / "vocabs" / "pg19train_bpe_4000.model"


@pytest.mark.skipif(not VOCAB_4000.is_file(), reason="the PG19 vocabularies of ../shared/data/vocabs are not here")
def test_recall_demo_values_are_one_token_per_word_and_tagged():
    """The recall triple's premise: with the 4000-piece vocabulary every value word is one token, so a far
    recall's 8 words are 8 tagged tokens that a one-token content match can copy."""
    from meliad_core.data import open_documents
    from meliad_core.vocab import load_vocabulary
    from meliad_data.synthetic import ledger_words

    recipe = recipes.load_recipe("demos/recall_xl", [f"data.options.vocabulary_path={VOCAB_4000}"])
    vocabulary = load_vocabulary(recipe.data)
    assert all(len(vocabulary.encode(f"x {word}.")) == len(vocabulary.encode("x.")) + 1 for word in ledger_words())
    document = open_documents(recipe.data, "eval")[0]
    assert len(document.long_range_spans) == 4 * 3  # num_facts x recalls_per_fact
    _, tagged = vocabulary.span_mask(document.text, document.long_range_spans)
    assert int(np.sum(tagged)) == 8 * len(document.long_range_spans)
