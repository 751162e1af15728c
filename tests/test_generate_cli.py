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


def test_eval_reproduces_the_runs_own_eval_figure(workdir, capsys):
    import json

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    own = next(r for r in rows if r["split"] == "eval" and r["step"] == 2)  # the run's only eval: stream start
    capsys.readouterr()
    assert cli.run_cli(["eval", str(workdir)]) == 0  # eval.steps batches, as the run did
    line = capsys.readouterr().out
    bits = float(line.split(" bits/token")[0].rsplit(" ", 1)[1])
    bits_char = float(line.split(" bits/char")[0].rsplit(" ", 1)[1])
    assert abs(bits - own["bits_per_token"]) <= 1e-3 and abs(bits_char - own["bits_per_char"]) <= 1e-3, (line, own)


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
