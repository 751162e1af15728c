"""The benchmark scripts run end to end at their tiniest settings and print their table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from meliad_core.config import validate_recipe

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
BACKEND = keras.backend.backend()
TINY_MODEL = ["--set", "model.num_layers=2", "--set", "model.embed_dim=16", "--set", "model.num_heads=2",
              "--set", "model.head_dim=8", "--set", "model.mlp_dim=32"]


def bench(script: str, *args: str) -> str:
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--backend", BACKEND, *args], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def table(out: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the markdown table a benchmark prints."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert len(lines) >= 3 and set(lines[1]) <= {"|", "-"}, out
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], [row for row in cells[2:]]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scaling_prints_a_table():
    out = bench("scaling.py", "--segment-lengths", "32", "--window", "16", "--memory-sizes", "64",
                "--memory-segment-length", "32", "--neighbors", "16", "--steps", "1", "--min-tokens", "1",
                "--intervals", "1", "--warmup", "1", *TINY_MODEL)
    assert out.startswith("command: python benchmarks/scaling.py --backend")
    assert "machine: " in out
    header, rows = table(out)
    assert header[:2] == ["part", "configuration"] and "us/token" in header and "peak MiB" in header
    assert [(r[0], r[1]) for r in rows] == [("segment", "N=32, W=16"), ("memory", "M=64, N=W=32, k=16")]
    for row in rows:
        assert not any(cell.startswith("failed") for cell in row), row
        assert row[2] == BACKEND and float(row[header.index("ms/step")]) > 0
    assert rows[0][header.index("vs first")] == "1.00x"


def test_long_range_prints_a_table(tmp_path):
    out = bench("long_range.py", "--recipes", "inline", "--steps", "2", "--eval-batches", "2", "--segment-length", "32",
                "--window", "16", "--batch-size", "2", "--memory-size", "128", "--neighbors", "16", "--states", "8",
                "--seeds", "1", "--workdir", str(tmp_path), *TINY_MODEL)
    assert out.startswith("command: python benchmarks/long_range.py --backend")
    assert "machine: " in out and "recipes: inline" in out and "load average at start: " in out
    header, rows = table(out)
    assert header[0] == "model" and "rest bits/tok" in header and "CPU s" in header
    assert [r[0] for r in rows] == ["xl", "memorizing", "recurrent"]
    for row in rows:
        assert not any(cell.startswith("failed") for cell in row), row
        assert row[header.index("steps")] == "2" and float(row[header.index("bits/tok")]) > 0
        assert row[header.index("seeds")] == "1"
        assert (tmp_path / f"{row[0]}_s1" / "report" / "long_range.json").is_file()
    assert rows[0][header.index("gain long-range")] == "-"  # XL against itself
    assert (tmp_path / "long_range_comparison.json").is_file()
    # run again on the same folder: the finished runs are reused, re-scored, and keep their training time
    again = bench("long_range.py", "--recipes", "inline", "--steps", "2", "--eval-batches", "2", "--segment-length",
                  "32", "--window", "16", "--batch-size", "2", "--memory-size", "128", "--neighbors", "16", "--states",
                  "8", "--seeds", "1", "--workdir", str(tmp_path), *TINY_MODEL)
    header_again, rows_again = table(again)
    for first, second in zip(rows, rows_again):
        for column in ("train s", "CPU s", "bits/tok"):
            assert second[header_again.index(column)] == first[header.index(column)], column


def test_long_range_seed_spread_gain_and_plot(tmp_path):
    """Two seeds, trained two at a time: every cell is a mean ± sd, the gains vs XL are paired by seed,
    the runs are listed in their (seed, model) order whichever finishes first, the comparison JSON holds
    one curve per model, and the plot is written (or skipped with one line without matplotlib)."""
    out = bench("long_range.py", "--recipes", "inline", "--models", "xl", "memorizing", "--steps", "2",
                "--eval-batches", "3", "--segment-length", "16", "--window", "8", "--batch-size", "2",
                "--memory-size", "64", "--neighbors", "8", "--seeds", "3", "4", "--workdir", str(tmp_path),
                "--jobs", "2", *TINY_MODEL)
    header, rows = table(out)
    assert [r[0] for r in rows] == ["xl", "memorizing"]
    for row in rows:
        assert row[header.index("seeds")] == "3 4"
        assert " ± " in row[header.index("bits/tok")] and " ± " in row[header.index("beyond 2 segments")]
    gain = rows[1][header.index("gain beyond 2 segments")]
    assert gain.endswith(tuple("0123456789")) and "%" in gain and " ± " in gain
    comparison = json.loads((tmp_path / "long_range_comparison.json").read_text())
    assert set(comparison["curves"]) == {"xl", "memorizing"}
    assert [(r["model"], r["seed"]) for r in comparison["runs"]] == [("xl", 3), ("memorizing", 3), ("xl", 4),
                                                                      ("memorizing", 4)]
    assert all(p["seeds"] == 2 for p in comparison["curves"]["xl"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "note: plot skipped: matplotlib is not installed" in out
    else:
        assert f"plot: {tmp_path / 'long_range.png'}" in out and (tmp_path / "long_range.png").is_file()
    # the plot can be redrawn from the JSON alone
    again = bench("long_range.py", "--plot-from", str(tmp_path / "long_range_comparison.json"))
    assert again.startswith(("plot: ", "note: plot skipped"))


def test_long_range_statistics():
    module = load_script("long_range")
    assert module.mean_sd([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5)) and module.mean_sd([2.0]) == (2.0, None)
    assert module.mean_sd([None]) == (None, None)
    assert module.fmt((0.25, 0.05), percent=True) == "+25.0% ± 5.0" and module.fmt((1.0, None)) == "1.000"
    report = {"segment_length": 8, "buckets": [
        {"start": 0, "end": 2, "tokens": 2, "bits_per_token": 5.0}, {"start": 8, "end": 16, "tokens": 8, "bits_per_token": 4.0},
        {"start": 16, "end": 32, "tokens": 10, "bits_per_token": 2.0}, {"start": 32, "end": 64, "tokens": 30, "bits_per_token": 1.0}]}
    assert module.beyond(report) == {"tokens": 40, "bits_per_token": pytest.approx((20 + 30) / 40)}
    xl = {"long_range": {"bits_per_token": 4.0}}
    assert module.gain({"long_range": {"bits_per_token": 3.0}}, xl, "long_range") == pytest.approx(0.25)
    assert module.gain({"long_range": {"bits_per_token": None}}, xl, "long_range") is None


def test_long_range_keeps_the_training_time_of_a_reused_run(tmp_path):
    module = load_script("long_range")
    measured = {"train_seconds": 12.5, "train_cpu_seconds": 20.0, "load_before": "1 1 1", "load_after": "2 2 2"}
    assert module.training_timing(str(tmp_path), measured, trained=True) == measured
    reused = dict.fromkeys(measured, 0.0)  # what a reused run measures: no training
    assert module.training_timing(str(tmp_path), reused, trained=False) == measured
    assert module.training_timing(str(tmp_path / "elsewhere"), reused, trained=False) == dict.fromkeys(measured)
    (tmp_path / module.TIMING_JSON).write_text("not json")
    assert module.training_timing(str(tmp_path), reused, trained=False) == dict.fromkeys(measured)


def test_long_range_compares_like_positions_when_segment_lengths_differ():
    """A triple whose models train on different N is compared on the same positions: the first
    segment becomes positions < the smallest N, beyond 2 segments positions >= 2 x the largest N."""
    module = load_script("long_range")

    def run(model, n, bits):  # log-spaced buckets of N; `bits(start)` per bucket, 10 tokens each
        edges = [0, n // 4, n // 2] + [n << k for k in range(7) if n << k <= 256]  # to position 256
        buckets = [{"start": a, "end": b, "tokens": 10, "bits_per_token": bits(a)} for a, b in zip(edges, edges[1:])]
        return {"model": model, "seed": 1, "segment_length": n, "buckets": buckets,
                "first_segment": module.positions(buckets, 0, n), "beyond_2_segments": module.positions(buckets, 2 * n)}

    runs = [run("xl", 8, lambda a: 4.0 if a < 8 else 2.0), run("recurrent", 32, lambda a: 3.0 if a < 32 else 1.0)]
    assert module.on_common_positions(runs[:1]) == runs[:1]
    xl, recurrent = module.on_common_positions(runs)
    assert xl["first_segment"] == {"tokens": 30, "bits_per_token": 4.0}  # [0, 8): xl's first segment
    assert recurrent["first_segment"] == {"tokens": 10, "bits_per_token": 3.0}  # [0, 8): not all of [0, 32)
    assert xl["beyond_2_segments"]["tokens"] == recurrent["beyond_2_segments"]["tokens"] == 20  # [64, 256) for both
    assert xl["beyond_2_segments"]["bits_per_token"] == 2.0 and recurrent["beyond_2_segments"]["bits_per_token"] == 1.0
    with pytest.raises(ValueError, match="straddles 12"):
        module.positions(runs[0]["buckets"], 12)


def test_long_range_recipes_are_valid():
    """The inline recipes at their default sizes (and the bundled and demo ones, where present) validate."""
    module = load_script("long_range")
    args = module.argparse.Namespace(segment_length=128, window=64, batch_size=4, memory_size=2048, neighbors=32,
                                     states=64, steps=500, sets=[], task="ledgers")
    sources = (["inline"] + (["bundled"] if module.bundled_available() else [])
               + (["demos"] if module.demos_available() else []))
    for source in sources:
        for model in module.MODELS:
            recipe = validate_recipe(module.recipe_mapping(model, args, source, seed=7))
            assert recipe.train.steps == 500 and recipe.eval.steps == 0 and recipe.train.seed == 7
            assert (recipe.memory is not None) == (model == "memorizing")
            assert (recipe.recurrence is not None) == (model == "recurrent")
    if module.demos_available():  # without --steps the demos keep their own budget
        args.steps = None
        own = validate_recipe(module.recipe_mapping("xl", args, "demos"))
        assert own.train.steps == validate_recipe(module.recipe_mapping("memorizing", args, "demos")).train.steps


@pytest.mark.parametrize("part, values", [("segment", [128, 256, 512, 1024, 2048]),
                                          ("memory", [1024, 4096, 16384, 32768])])
def test_scaling_default_configurations_are_valid(part, values):
    from meliad_core.recipes import apply_override, resolve_recipe_mapping

    module = load_script("scaling")
    for value in values:
        mapping = resolve_recipe_mapping("sizes/tiny_test")
        for text in module.overrides_for(part, value, window=128, memory_segment_length=256, neighbors=128):
            mapping = apply_override(mapping, text)
        validate_recipe(mapping)


def _probe_losses(probe, text: str, target_bits):
    """`meliad eval --token-losses` arrays for a bytes-encoded text, one row of 128-token segments, with
    target_bits(ids) -> the bits of predicting each character (a numpy array as long as the ids)."""
    import numpy as np

    ids = np.frombuffer(text.encode(), np.uint8).astype(np.int32) + probe.BYTE_OFFSET
    n = 128
    ids = np.concatenate([ids, np.zeros(-len(ids) % n, np.int32)])
    bits = np.concatenate([target_bits(ids)[1:], [0.0]]).astype(np.float32)  # bits[t]: loss of predicting t + 1
    k = len(ids) // n
    return {"tokens": ids.reshape(k, 1, n), "bits": bits.reshape(k, 1, n),
            "scored": (ids > 0).reshape(k, 1, n), "start_of_sequence": np.eye(k, 1, dtype=bool)}


def test_copy_probe_finds_every_kind_of_mention():
    """Bits placed on the read-back values only come back under the read-backs, and the far recalls are
    the synthetic source's own long-range spans."""
    import numpy as np
    from meliad_data.synthetic import SyntheticLedgers

    probe = load_script("copy_probe")
    doc = SyntheticLedgers("eval", 1, document_length=1500, num_facts=3, recalls_per_fact=1,
                           min_recall_distance=400, near_recalls=2)[0]

    def target_bits(ids):
        bits = np.full(len(ids), 5.0, np.float32)
        for m in probe.VALUE.finditer(doc.text):
            if probe.mention_kind(doc.text, m.start(1)).startswith("read-back"):
                bits[m.start(1):m.end(1)] = 1.0
        return bits

    table = probe.copy_table(_probe_losses(probe, doc.text, target_bits))
    assert set(table) == {"stated", "read-back", "far recall"}
    assert table["read-back"]["rest"][0] == 1.0 and table["read-back"]["first"][0] == 1.0
    assert table["read-back"]["first"][1] == 3 * 2  # two read-backs after each of the three statements
    assert table["stated"]["first"][0] == 5.0
    far_chars = sum(end - start for start, end in doc.long_range_spans)
    assert table["far recall"]["first"][1] + table["far recall"]["rest"][1] == far_chars


def test_copy_probe_reads_the_lines_layout():
    """Bits placed on the read-backs come back under them only; the far recalls are exactly the source's
    long-range spans."""
    import numpy as np
    from meliad_data.synthetic import SyntheticLedgers

    probe = load_script("copy_probe")
    doc = SyntheticLedgers("eval", 1, document_length=1500, num_facts=3, recalls_per_fact=1,
                           min_recall_distance=500, layout="lines")[0]

    def target_bits(ids):
        bits = np.full(len(ids), 5.0, np.float32)
        for m in probe.LINE.finditer(doc.text):
            if m.group(2) == " = ":
                bits[m.start(3):m.end(3)] = 0.5
        for start, end in doc.long_range_spans:
            bits[start:end] = 2.0
        return bits

    table = probe.copy_table(_probe_losses(probe, doc.text, target_bits))
    assert set(table) == {"stated", "read-back", "far recall"}
    assert table["read-back"]["rest"][0] == 0.5 and table["stated"]["rest"][0] == 5.0
    assert table["far recall"]["first"][0] == 2.0 and table["far recall"]["rest"][0] == 2.0
    far_chars = sum(end - start for start, end in doc.long_range_spans)
    assert table["far recall"]["first"][1] + table["far recall"]["rest"][1] == far_chars == 3 * 12


def test_knn_probe_pairs_each_word_with_its_previous_mention_and_ranks_by_score():
    import numpy as np
    from meliad_data.synthetic import SyntheticLedgers
    from meliad_vocab import ByteVocabulary

    probe = load_script("knn_probe")
    doc = SyntheticLedgers("eval", 1, document_length=1500, num_facts=2, recalls_per_fact=1,
                           min_recall_distance=500, layout="lines", value_letters=4)[0]
    ids, starts, ends = ByteVocabulary().encode_with_offsets(doc.text)
    pairs = probe.copy_pairs(doc.text, {a for a, _ in doc.long_range_spans}, starts, ends)
    far = [p for p in pairs if p[0] == "far recall"]
    assert len(far) == 2 * 3  # two far recalls, letters 2-4 of each
    for kind, t, s in pairs:  # the query's token is the one before the needed key's token, both the same value
        assert doc.text[starts[t]] == doc.text[starts[s] - 1] and doc.text[starts[t] + 1] == doc.text[starts[s]]
        assert s < t
    # ranks: the needed key scores highest -> 0; one other key above it -> 1; keys out of range are left out
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(40, 2, 4)).astype(np.float32)
    queries = np.zeros_like(keys)
    queries[30] = keys[5] * 10  # query 30 matches key 5 (both heads)
    keys[6] = keys[5] * 2  # ... but key 6 scores higher still
    ranks = probe.key_ranks(queries, keys, [("far recall", 30, 5), ("read-back", 30, 5), ("far recall", 30, 35)],
                            segment_length=10, window=10, memory_size=30)
    assert ranks["far recall"].tolist() == [[1, 1]]  # key 35 is not in the memory yet: left out
    assert "read-back" not in ranks  # key 5 is out of the local window's reach (keys 20..30)


def test_knn_probe_reads_a_memorizing_run_and_refuses_others(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "2"}
    settings = ["data.options.layout=lines", "data.options.value_letters=4", "data.options.document_length=1500",
                "data.options.min_recall_distance=500", "data.batch_size=2", "train.steps=2",
                "train.checkpoint_every=2", "eval.every=2", "eval.report_batches=0", "model.num_layers=2",
                "memory.size=512", "model.smear_keys=true"]
    command = [sys.executable, "-m", "meliad_core.cli", "run", "recipes/demos/ledgers_memorizing.yaml", "--backend",
               BACKEND, "--workdir", str(run)] + [a for s in settings for a in ("--set", s)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600,
                          cwd=BENCHMARKS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = bench("knn_probe.py", str(run), "--documents", "1")
    header, rows = table(out)
    assert {row[0] for row in rows} == {"transformer1"} and {row[1] for row in rows} == {"far recall", "read-back"}
    assert all(len(row[3].split(",")) == 4 for row in rows)  # a median rank per head
    refused = subprocess.run([sys.executable, str(BENCHMARKS / "knn_probe.py"), str(tmp_path / "none")],
                             capture_output=True, text=True, env=env, timeout=600)
    assert refused.returncode == 1 and "no valid checkpoint" in refused.stderr


ROOT = BENCHMARKS.parent
SHARED = ROOT.parent / "shared"
SP_4000 = SHARED / "data" / "vocabs" / "pg19train_bpe_4000.model"
RECALL_XL = ROOT / "recipes" / "demos" / "recall_xl.yaml"
# bits planted on the tokens of each kind of value mention: (first token, rest); 9.0 everywhere else
PLANTED = {"stated": (7.0, 3.0), "read-back": (6.0, 0.5), "far recall": (5.0, 2.0)}


def _sentencepiece():
    """The PG19 4000-piece SentencePiece vocabulary of ../shared (skips the test where there is none)."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} does not exist: no PG19 SentencePiece model")
    pytest.importorskip("sentencepiece")
    from meliad_vocab import SentencePieceVocabulary

    return SentencePieceVocabulary(SP_4000)


def _stream_losses(documents, n: int = 64) -> dict:
    """`meliad eval --token-losses` arrays for documents given as (ids, target bits): each document from
    a segment start and padded to a whole segment, the documents dealt to two rows in turn;
    target_bits[t] is the loss of predicting token t (stored at position t - 1, as the eval writes it)."""
    import numpy as np

    rows: list[list[tuple]] = [[], []]
    for i, (ids, target_bits) in enumerate(documents):
        pad = -len(ids) % n
        ids = np.concatenate([ids, np.zeros(pad, np.int32)]).astype(np.int32)
        bits = np.concatenate([target_bits[1:], np.zeros(pad + 1)]).astype(np.float32)
        for k in range(len(ids) // n):
            rows[i % 2].append((ids[k * n:(k + 1) * n], bits[k * n:(k + 1) * n], k == 0))
    batches = max(len(row) for row in rows)
    for row in rows:
        row += [(np.zeros(n, np.int32), np.zeros(n, np.float32), False)] * (batches - len(row))
    tokens = np.stack([np.stack([seg[0] for seg in row]) for row in rows], axis=1)
    return {"tokens": tokens, "bits": np.stack([np.stack([seg[1] for seg in row]) for row in rows], axis=1),
            "scored": tokens > 0, "start_of_sequence": np.array([[seg[2] for seg in row] for row in rows]).T,
            "live": np.ones(tokens.shape[:2], bool)}


def _planted(vocabulary, text: str, mentions) -> tuple:
    """(ids, target bits, tokens per kind) of `text` encoded with `vocabulary`: the tokens covering each
    (kind, start, end) mention get PLANTED[kind] (first token, rest), every other token 9.0."""
    import numpy as np

    ids, starts, ends = vocabulary.encode_with_offsets(text)
    bits = np.full(len(ids), 9.0)
    counts: dict[str, list[int]] = {}
    for kind, start, end in mentions:
        covering = np.flatnonzero((starts < end) & (ends > start))
        bits[covering[0]], bits[covering[1:]] = PLANTED[kind]
        firsts, rests = counts.setdefault(kind, [0, 0])
        counts[kind] = [firsts + 1, rests + len(covering) - 1]
    return np.asarray(ids, np.int32), bits, counts


def _recall_xl_documents(count: int = 2):
    from meliad_core.recipes import load_recipe
    from meliad_data.synthetic import open_synthetic

    recipe = load_recipe(RECALL_XL, check_plugins=False)
    return recipe, [open_synthetic(recipe.data, "eval", 0)[i] for i in range(count)]


def test_copy_probe_reads_sentencepiece_lines_by_token():
    """recall_xl's ledgers (lines, 8 one-piece words a value) encoded with the 4000-piece model: the
    bits planted on each kind's first and other tokens come back exactly, one first token and 7 others
    per mention, and the far recalls are the source's long-range spans (the boundary, from the recipe,
    being its min_recall_distance: 400 characters would count far-reaching read-backs as far)."""
    vocabulary = _sentencepiece()
    probe = load_script("copy_probe")
    recipe, docs = _recall_xl_documents()
    near = probe.default_near(recipe.data)
    assert near == recipe.data.options["min_recall_distance"] > probe.NEAR
    planted, expected = [], {}
    for doc in docs:
        far = {start for start, _ in doc.long_range_spans}
        mentions = [("stated" if m.group(2) == ": " else "far recall" if m.start(3) in far else "read-back",
                     *m.span(3)) for m in probe.LINE.finditer(doc.text)]
        ids, bits, counts = _planted(vocabulary, doc.text, mentions)
        planted.append((ids, bits))
        for kind, (firsts, rests) in counts.items():
            expected[kind] = [a + b for a, b in zip(expected.get(kind, [0, 0]), (firsts, rests))]
    losses = _stream_losses(planted)
    table = probe.copy_table(losses, vocabulary, near)
    assert set(table) == set(PLANTED)
    for kind, (first, rest) in PLANTED.items():
        assert table[kind]["first"] == (first, expected[kind][0]), kind
        assert table[kind]["rest"] == (rest, expected[kind][1]), kind
        assert table[kind]["rest"][1] == 7 * table[kind]["first"][1]  # each value word is one piece
    assert table["far recall"]["first"][1] == sum(len(doc.long_range_spans) for doc in docs) > 0
    assert probe.copy_table(losses, vocabulary, probe.NEAR)["far recall"]["first"][1] > expected["far recall"][0]
    # the bytes reading of the same ids finds nothing of it
    assert probe.copy_table(losses) == {}


def test_copy_probe_reads_sentencepiece_prose_by_token():
    """The prose layout (codes and towns, several pieces each) through the 4000-piece model: statements,
    read-backs and far recalls are told apart although the model turns the newlines into spaces."""
    import numpy as np
    from meliad_data.synthetic import SyntheticLedgers

    vocabulary = _sentencepiece()
    probe = load_script("copy_probe")
    doc = SyntheticLedgers("eval", 1, document_length=2500, num_facts=4, recalls_per_fact=2,
                           min_recall_distance=500, near_recalls=1)[0]
    mentions = [(probe.mention_kind(doc.text, m.start(1)), *m.span(1)) for m in probe.VALUE.finditer(doc.text)]
    ids, bits, counts = _planted(vocabulary, doc.text, mentions)
    assert "\n" not in vocabulary.decode(ids.tolist())  # so the bytes rules (paragraphs) could not work here
    table = probe.copy_table(_stream_losses([(ids, bits)]), vocabulary)
    assert {kind: [table[kind]["first"][1], table[kind]["rest"][1]] for kind in table} == counts
    assert counts["far recall"][0] == len(doc.long_range_spans) and counts["stated"][0] == 4
    for kind, (first, rest) in PLANTED.items():
        assert table[kind]["first"][0] == first and table[kind]["rest"][0] == rest
    assert np.all(np.asarray([counts[k][1] for k in counts]) > 0)  # values of several pieces


def test_copy_probe_token_offsets_cover_each_value():
    """The text rebuilt piece by piece keeps each token's text where it starts: a value's first token is
    the one holding its first character (its leading space included), and the '.' after it is left out."""
    vocabulary = _sentencepiece()
    probe = load_script("copy_probe")
    import numpy as np

    text = "The ledger of Kamere, number 3.\nTarin: fold weary lamp.\nTarin = fold weary lamp.\n"
    ids = np.asarray(vocabulary.encode(text), np.int32)
    ((doc, starts, ends, _, _),) = probe.token_documents(_stream_losses([(ids, np.zeros(len(ids)))], n=16),
                                                         vocabulary)
    assert doc.rstrip() == " " + text.replace("\n", " ").rstrip()  # the dummy prefix, newlines as spaces
    found = [(kind, probe.covering_tokens(starts, ends, a, z)) for kind, a, z in
             probe.line_mentions(probe.SENTENCE_LINE, doc, probe.NEAR)]
    assert [kind for kind, _ in found] == ["stated", "read-back"]
    for _, tokens in found:
        assert "".join(doc[starts[t]:ends[t]] for t in tokens) == " fold weary lamp"
        assert doc[ends[tokens[-1]]] == "."


def test_copy_probe_bytes_output_is_unchanged(tmp_path, capsys):
    """The bytes reading: the same table with no vocabulary and with the bytes one, and the printed table
    (first *character*) with the planted bits, as before the token mode."""
    import numpy as np
    from meliad_data.synthetic import SyntheticLedgers
    from meliad_vocab import ByteVocabulary

    probe = load_script("copy_probe")
    doc = SyntheticLedgers("eval", 1, document_length=1500, num_facts=3, recalls_per_fact=1,
                           min_recall_distance=500, layout="lines")[0]
    far = {start for start, _ in doc.long_range_spans}
    mentions = [("stated" if m.group(2) == ": " else "far recall" if m.start(3) in far else "read-back", *m.span(3))
                for m in probe.LINE.finditer(doc.text)]
    ids, bits, counts = _planted(ByteVocabulary(), doc.text, mentions)
    losses = _stream_losses([(ids, bits)])
    assert probe.copy_table(losses) == probe.copy_table(losses, ByteVocabulary())
    np.savez(tmp_path / "losses.npz", **losses)
    assert probe.main(["--losses", str(tmp_path / "losses.npz")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| mention | first character, bits | tokens | rest of the value, bits | tokens |"
    assert lines[2:] == [f"| {kind} | {PLANTED[kind][0]:.3f} | {counts[kind][0]} | {PLANTED[kind][1]:.3f} | "
                         f"{counts[kind][1]} |" for kind in ("stated", "read-back", "far recall")]
    assert counts["far recall"] == [3, 3 * 11]  # 12-letter values, a token per letter


def test_copy_probe_names_the_vocabulary_with_a_recipe(tmp_path, capsys, monkeypatch):
    """--losses with --recipe (a recipe file, its vocabulary_path read from the working directory): the
    table is by token."""
    vocabulary = _sentencepiece()
    probe = load_script("copy_probe")
    import numpy as np

    _, (doc,) = _recall_xl_documents(1)
    ids = np.asarray(vocabulary.encode(doc.text), np.int32)
    np.savez(tmp_path / "losses.npz", **_stream_losses([(ids, np.ones(len(ids)))]))
    monkeypatch.chdir(ROOT)
    assert probe.main(["--losses", str(tmp_path / "losses.npz"), "--recipe", str(RECALL_XL)]) == 0
    header, rows = table(capsys.readouterr().out)
    assert header[1] == "first token, bits" and [row[0] for row in rows] == ["stated", "read-back", "far recall"]
    assert all(row[1] == row[3] == "1.000" for row in rows)


def test_copy_probe_refuses_with_one_line(tmp_path, capsys, monkeypatch):
    """No workdir, a workdir without a checkpoint, a vocabulary file that is not there, an .npz without
    the arrays, a file that is no .npz: exit status 1 and one line saying so."""
    import numpy as np
    import yaml

    from meliad_core.recipes import resolve_recipe_mapping

    probe = load_script("copy_probe")
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "partial.npz", tokens=np.zeros((1, 1, 8), np.int32))
    (tmp_path / "text.npz").write_text("not an archive")
    mapping = resolve_recipe_mapping(RECALL_XL)
    mapping["data"]["options"]["vocabulary_path"] = "vocabs/none.model"
    (tmp_path / "missing_vocab.yaml").write_text(yaml.safe_dump(mapping))
    (tmp_path / "empty_run").mkdir()
    cases = [([str(tmp_path / "no_run")], "no such directory"),
             ([str(tmp_path / "empty_run")], "no valid checkpoint"),
             (["--losses", "partial.npz", "--recipe", "missing_vocab.yaml"], "vocabs/none.model"),
             (["--losses", "partial.npz"], "no bits, scored, start_of_sequence array"),
             (["--losses", "text.npz"], "text.npz: cannot be read")]
    for argv, needle in cases:
        assert probe.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err, (argv, err)
