"""`meliad generate` and `meliad eval` on a tiny trained run; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

from meliad_core import cli

TINY = {"name": "tiny_generate",
        "model": {"num_layers": 2, "embed_dim": 16, "num_heads": 2, "head_dim": 8, "mlp_dim": 32},
        "attention": {"window": 8},
        "recurrence": {"layers": [-1], "num_states": 4},
        "data": {"segment_length": 16, "batch_size": 2,
                 "options": {"num_documents": 4, "num_eval_documents": 2, "document_length": 120}},
        "train": {"steps": 2, "warmup": 1, "checkpoint_every": 2, "log_every": 2},
        "eval": {"every": 2, "steps": 2, "report_batches": 0}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from meliad_core.config import validate_recipe
    from meliad_core.runner import run_training

    os.environ.setdefault("KERAS_BACKEND", "jax")
    folder = tmp_path_factory.mktemp("gen") / "run"
    run_training(validate_recipe(TINY), folder, out=io.StringIO())
    return folder


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_generate_streams_text(workdir, capsys):
    capsys.readouterr()
    assert cli.run_cli(["generate", str(workdir), "--prompt", "Account 17 holds", "--max-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and 0 < len(out.encode()) <= 21 * 4
    # the same seed samples the same text; the text comes from the run's vocabulary (bytes)
    args = ["generate", str(workdir), "--prompt", "Account 17 holds", "--max-tokens", "12", "--top-p", "0.9",
            "--temperature", "0.8", "--seed", "3"]
    assert cli.run_cli(args) == 0
    first = capsys.readouterr().out
    assert cli.run_cli(args) == 0
    assert capsys.readouterr().out == first


def test_generate_with_prompt_file_ids_and_checkpoint(workdir, tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("Ledger: " * 5, encoding="utf-8")  # 40 bytes: two segments by the segment path, then steps
    assert cli.run_cli(["generate", str(workdir), "--prompt-file", str(prompt), "--max-tokens", "5",
                        "--checkpoint", "2", "--top-k", "3"]) == 0
    assert cli.run_cli(["generate", str(workdir), "--prompt-ids", "70,71,72", "--max-tokens", "3"]) == 0
    assert cli.run_cli(["generate", str(workdir), "--prompt", "x", "--max-tokens", "0"]) == 0
    assert capsys.readouterr().out.count("\n") == 3


def test_generate_with_a_host_memory_store(tmp_path, capsys):
    """A host store (exact_host) decodes too: the continuation crosses a segment boundary, so the memory
    is queried token by token and written at the boundary through host calls."""
    import yaml

    recipe = {key: value for key, value in TINY.items() if key != "recurrence"}
    recipe = {**recipe, "attention": {"window": 16},
              "memory": {"layers": [-1], "size": 32, "neighbors": 4, "store": "exact_host"}}
    path = tmp_path / "host.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    capsys.readouterr()
    assert cli.run_cli(["generate", str(path), "--prompt", "Account 17", "--max-tokens", "30"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and "error" not in captured.err


def test_eval_prints_bits_and_writes_token_losses(workdir, tmp_path, capsys):
    out = tmp_path / "losses.npz"
    assert cli.run_cli(["eval", str(workdir), "--batches", "2", "--token-losses", str(out)]) == 0
    line = capsys.readouterr().out
    assert "bits/token" in line and "bits/char" in line
    with np.load(out) as data:
        assert data["bits"].shape == (2, 2, 16) and data["scored"].dtype == bool
        bits = float(line.split(" bits/token")[0].rsplit(" ", 1)[1])
        np.testing.assert_allclose(data["bits"][data["scored"]].mean(), bits, rtol=1e-3)
    assert cli.run_cli(["eval", str(workdir), "--batches", "1", "--data", "data.batch_size=1"]) == 0


def printed(line: str, unit: str) -> float:
    return float(line.split(f" {unit}")[0].rsplit(" ", 1)[1])


def own_eval(workdir) -> dict:
    """The run's only eval row (eval.every = train.steps: one pass from the stream's start, empty state)."""
    import json

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r["split"] == "eval"]
    return row


# Float32 per-token losses summed in float64 here, token-weighted float32 batch means in the run:
# they differ by float32 rounding only (about 1e-7 relative), so 1e-5 relative is tight.
TOLERANCE = 1e-5


def test_eval_capped_reproduces_the_runs_own_eval_figure(workdir, capsys):
    """The run's eval read eval.steps = 2 batches of documents longer than that: --batches 2 is the same pass."""
    own = own_eval(workdir)
    capsys.readouterr()
    assert cli.run_cli(["eval", str(workdir), "--batches", "2"]) == 0
    line = capsys.readouterr().out
    assert "2 batches" in line and "0 documents complete" in line and "stopped at --batches 2" in line, line
    assert printed(line, "bits/token") == pytest.approx(own["bits_per_token"], rel=TOLERANCE), (line, own)
    assert printed(line, "bits/char") == pytest.approx(own["bits_per_char"], rel=TOLERANCE), (line, own)


EVAL_DOC = "The ledger of account 17 holds 4,250 coins now.\n"  # 48 bytes: exactly 3 segments of 16


@pytest.fixture(scope="module")
def text_workdir(tmp_path_factory):
    """A run on text files whose eval split is 2 documents of 3 segments: its eval (eval.steps = 3) reads
    every eval document once, from its start, with no slot running out early."""
    from meliad_core.config import validate_recipe
    from meliad_core.runner import run_training

    os.environ.setdefault("KERAS_BACKEND", "jax")
    root = tmp_path_factory.mktemp("text")
    (root / "train.txt").write_text("Account 3 holds 17 coins. " * 20, encoding="utf-8")
    for i in range(2):
        (root / f"eval{i}.txt").write_text(EVAL_DOC.replace("17", f"{i + 1:02d}"), encoding="utf-8")
    recipe = {**TINY, "name": "tiny_text",
              "data": {"segment_length": 16, "batch_size": 2, "source": "text_files",
                       "options": {"paths": str(root / "train.txt"), "eval_paths": str(root / "eval*.txt")}},
              "eval": {"every": 2, "steps": 3, "report_batches": 0}}
    folder = root / "run"
    run_training(validate_recipe(recipe), folder, out=io.StringIO())
    return folder


def test_eval_of_whole_documents_reproduces_the_runs_own_eval_figure(text_workdir, capsys):
    own = own_eval(text_workdir)
    capsys.readouterr()
    assert cli.run_cli(["eval", str(text_workdir)]) == 0  # default: every eval document to its end
    line = capsys.readouterr().out
    assert "3 batches" in line and "2 documents complete (every document read to its end)" in line, line
    assert printed(line, "bits/token") == pytest.approx(own["bits_per_token"], rel=TOLERANCE), (line, own)
    assert printed(line, "bits/char") == pytest.approx(own["bits_per_char"], rel=TOLERANCE), (line, own)
    assert int(line.split(" scored tokens")[0].rsplit(" ", 1)[1].replace(",", "")) == own["scored_tokens"]


def test_eval_pads_slots_that_run_out_and_scores_no_padding(text_workdir, tmp_path, capsys):
    """Three eval documents of 3, 1 and 2 segments on 2 slots: slot 0 reads 3 segments, slot 1 reads 1 + 2;
    nothing is left after 3 batches, and no padding (nor a next epoch's document) is scored."""
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = [EVAL_DOC, EVAL_DOC[:16], EVAL_DOC[:20]]  # 3, 1 and 2 segments
    for i, text in enumerate(texts):
        (docs / f"d{i}.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "losses.npz"
    capsys.readouterr()
    assert cli.run_cli(["eval", str(text_workdir), "--data", f"data.options.eval_paths={docs}/d*.txt",
                        "--data", "data.options.shuffle=false", "--token-losses", str(out)]) == 0
    line = capsys.readouterr().out
    assert "3 batches" in line and "3 documents complete (every document read to its end)" in line, line
    with np.load(out) as data:
        assert data["bits"].shape == (3, 2, 16)
        # every document's scored tokens: within a segment, pairs of non-padding tokens
        expected = sum(len(t[k:k + 16]) - 1 for t in texts for k in range(0, len(t), 16))
        assert int(data["scored"].sum()) == expected
        assert not data["scored"][~data["live"]].any() and not data["tokens"][~data["live"]].any()
        assert data["start_of_sequence"].sum() == 3
        assert printed(line, "bits/token") == pytest.approx(float(data["bits"][data["scored"]].mean()), rel=1e-5)


def test_eval_report_uses_the_data_given(workdir, text_workdir, capsys):
    """--report reports the batches of this eval, on the --data source, not on the run's own data."""
    import json

    eval_glob = str(text_workdir.parent / "eval*.txt")
    every = str(text_workdir.parent / "*.txt")
    capsys.readouterr()
    assert cli.run_cli(["eval", str(workdir), "--report", "--data", "data.source=text_files",
                        "--data", f"data.options={{paths: '{every}', eval_paths: '{eval_glob}'}}"]) == 0
    line = capsys.readouterr().out
    result = json.loads((workdir / "report" / "eval_step_2" / "long_range.json").read_text())
    assert result["data"]["source"] == "text_files" and result["data"]["options"]["eval_paths"] == eval_glob
    assert result["batches"] == 3 and result["documents_started"] == 2 and result["all_documents"]
    assert result["overall"]["tokens"] == 2 * 3 * 15  # 2 documents of 3 full segments, 15 scored each
    assert result["overall"]["bits_per_token"] == pytest.approx(printed(line, "bits/token"), abs=5e-5)
    assert "eval_step_2" in line and "long_range.json" in line


def assert_one_line_exit_2(status, capsys, fragment):
    captured = capsys.readouterr()
    assert status == 2, captured.err
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meliad: error: ") and fragment in lines[0], captured.err


@pytest.mark.parametrize("args, fragment", [
    (["--prompt", "", "--max-tokens", "5"], "the prompt is empty"),
    (["--prompt-file", "MISSING", "--max-tokens", "5"], "no such file"),
    (["--prompt-file", "BINARY", "--max-tokens", "5"], "not UTF-8"),
    (["--prompt-file", "EMPTY", "--max-tokens", "5"], "the prompt is empty"),
    (["--prompt-ids", "1,2,999", "--max-tokens", "5"], "id 999 is outside the vocabulary"),
    (["--prompt-ids", "0", "--max-tokens", "5"], "outside the vocabulary"),
    (["--prompt", "hi", "--max-tokens", "-1"], "--max-tokens"),
    (["--prompt", "hi", "--max-tokens", "5", "--top-p", "1.5"], "sampler.p"),
    (["--prompt", "hi", "--max-tokens", "5", "--sampler", "nope"], "unknown sampler 'nope'"),
    (["--max-tokens", "5"], "give exactly one of --prompt"),
    (["--prompt", "hi", "--max-tokens", "5", "--checkpoint", "7"], "no checkpoint of step 7"),
])
def test_generate_bad_input(workdir, tmp_path, capsys, args, fragment):
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "empty.txt").write_bytes(b"")
    names = {"MISSING": tmp_path / "missing.txt", "BINARY": tmp_path / "binary.txt", "EMPTY": tmp_path / "empty.txt"}
    args = [str(names.get(a, a)) for a in args]
    before = listing(workdir)
    assert_one_line_exit_2(cli.run_cli(["generate", str(workdir), *args]), capsys, fragment)
    assert listing(workdir) == before


def test_workdir_without_checkpoints(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    assert_one_line_exit_2(cli.run_cli(["generate", str(tmp_path / "empty_run"), "--prompt", "hi",
                                        "--max-tokens", "3"]), capsys, "no checkpoint")
    assert_one_line_exit_2(cli.run_cli(["eval", str(tmp_path / "empty_run")]), capsys, "no checkpoint")
    assert listing(tmp_path / "empty_run") == []


def test_eval_bad_input(workdir, tmp_path, capsys):
    before = listing(workdir)
    assert_one_line_exit_2(cli.run_cli(["eval", str(workdir), "--data", "data.segment_length=12"]), capsys,
                           "data.segment_length")
    assert_one_line_exit_2(cli.run_cli(["eval", str(workdir), "--token-losses", str(tmp_path / "x.txt")]), capsys,
                           "--token-losses")
    assert listing(workdir) == before and not (tmp_path / "x.txt").exists()
