"""The long-range report: numbers that add up, positions that restart with documents, a matplotlib
PNG (where the `plot` extra is installed) or one line saying it was skipped (where it is not, or
is made to look missing), and `meliad report` as a user runs it."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from meliad_core import checkpoint as ckpt
from meliad_core import cli
from meliad_core.config import validate_recipe
from meliad_core.report import (JSON_NAME, PLOT_HINT, PNG_NAME, REPORT_DIR, DocumentPositions, PlotUnavailable,
                                ReportError, bucket_edges, long_range_report, plot_figure, summarize, write_plot)
from meliad_core.runner import run_training

BACKEND = keras.backend.backend()
B, N = 2, 32
BATCHES = 30
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
needs_matplotlib = pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed here (the plot "
                                      "extra; tox installs it in the tensorflow env)")


def report_recipe() -> dict:
    """Short documents (a few hundred bytes) so that each slot runs through several in BATCHES batches."""
    return {
        "name": "report_run",
        "model": {"num_layers": 2, "embed_dim": 32, "num_heads": 2, "head_dim": 16, "mlp_dim": 64,
                  "dropout": 0.1, "attn_dropout": 0.1},
        "attention": {"window": 16},
        "data": {"segment_length": N, "batch_size": B,
                 "options": {"num_documents": 8, "num_eval_documents": 6, "document_length": 200, "num_facts": 2,
                             "recalls_per_fact": 1, "min_recall_distance": 64}},
        "train": {"steps": 3, "warmup": 1, "checkpoint_every": 3, "log_every": 3},
        "eval": {"every": 3, "steps": 1},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("report_run")
    with open(os.devnull, "w") as out:
        run_training(validate_recipe(report_recipe()), workdir, out=out)
    return workdir


@pytest.fixture(scope="module")
def report(trained) -> dict:
    with open(os.devnull, "w") as out:
        return long_range_report(trained, batches=BATCHES, out=out)


def _bits_sum(category: dict) -> float:
    return category["tokens"] * category["bits_per_token"] if category["tokens"] else 0.0


# ----------------------------------------------------------------------------------------------
# the JSON


def test_report_files_and_keys(trained, report):
    on_disk = json.loads((trained / REPORT_DIR / JSON_NAME).read_text())
    assert on_disk == json.loads(json.dumps(report))
    for key in ("overall", "long_range", "rest", "first_segment", "later_segments", "buckets", "bucketing",
                "checkpoint", "step", "backend", "batches", "batch_size", "segment_length", "plot"):
        assert key in report, key
    assert report["step"] == 3 and report["backend"] == BACKEND and report["batches"] == BATCHES
    assert (report["batch_size"], report["segment_length"]) == (B, N)
    assert report["checkpoint"].endswith("step_3")
    for bucket in report["buckets"]:
        assert set(bucket) == {"start", "end", "tokens", "bits_per_token", "long_range_tokens",
                               "long_range_bits_per_token"}


def test_report_numbers_add_up(report):
    overall, buckets = report["overall"], report["buckets"]
    total = overall["tokens"]
    assert total > 0 and 0 < overall["bits_per_token"] < 20
    assert total <= BATCHES * B * (N - 1)  # the last position of a segment is never scored
    # buckets partition the scored tokens, and their token-weighted mean is the overall number
    assert sum(b["tokens"] for b in buckets) == total
    weighted = sum(_bits_sum({"tokens": b["tokens"], "bits_per_token": b["bits_per_token"]}) for b in buckets)
    assert weighted / total == pytest.approx(overall["bits_per_token"], rel=1e-9)
    assert all(a["end"] == b["start"] for a, b in zip(buckets, buckets[1:])) and buckets[0]["start"] == 0
    assert report["bucketing"] == "log" and [b["end"] for b in buckets[:3]] == [N // 4, N // 2, N]
    # long-range + rest and first + later segments are two more partitions
    lr, rest = report["long_range"], report["rest"]
    assert lr["tokens"] > 0, "no long-range token in the eval batches: the test data should have some"
    assert lr["tokens"] + rest["tokens"] == total
    assert (_bits_sum(lr) + _bits_sum(rest)) / total == pytest.approx(overall["bits_per_token"], rel=1e-9)
    assert sum(b["long_range_tokens"] for b in buckets) == lr["tokens"]
    first, later = report["first_segment"], report["later_segments"]
    assert first["tokens"] + later["tokens"] == total
    assert (_bits_sum(first) + _bits_sum(later)) / total == pytest.approx(overall["bits_per_token"], rel=1e-9)


def test_positions_restart_with_each_document(report):
    # each slot went through several documents: more first segments than one per slot, and no position
    # beyond what one document can reach
    assert report["documents_started"] > B
    assert report["first_segment"]["tokens"] > B * (N - 1)
    assert report["max_position"] < BATCHES * N - N


def test_overall_equals_the_eval_metric_on_a_fresh_stream(trained, report):
    from meliad_core.data import keras_inputs, stream
    from meliad_core.model import build_model

    _, manifest, arrays = ckpt.latest_valid_checkpoint(trained)
    recipe = validate_recipe(manifest["recipe"])
    model = build_model(recipe)
    model.compile(optimizer="sgd")
    ckpt.restore(model, None, manifest, arrays, weights_only=True)
    data = stream(recipe, split="eval")
    bits = count = 0.0
    for _ in range(BATCHES):
        batch = next(data)
        logs = model.test_on_batch(keras_inputs(batch), return_dict=True)
        scored = float(logs["scored_tokens"])
        bits += float(logs["bits_per_token"]) * scored
        count += scored
    assert count == report["overall"]["tokens"]
    assert bits / count == pytest.approx(report["overall"]["bits_per_token"], rel=1e-4)


# ----------------------------------------------------------------------------------------------
# pieces


def test_document_positions_restart_at_start_of_sequence():
    tracker = DocumentPositions(batch_size=3, segment_length=4)
    flags = [[True, True, True], [False, True, False], [False, False, True], [True, False, False]]
    expected_segments = [[0, 0, 0], [1, 0, 1], [2, 1, 0], [0, 2, 1]]
    for sos, segments in zip(flags, expected_segments):
        positions = tracker.update(np.array(sos))
        assert tracker.segments.tolist() == segments
        # targets: offset j scores the token at j + 1 of this segment
        np.testing.assert_array_equal(positions, np.array(segments)[:, None] * 4 + np.arange(1, 5)[None, :])
    # a stream picked up mid-document counts from its first batch
    assert DocumentPositions(1, 4).update(np.array([False])).tolist() == [[1, 2, 3, 4]]
    with pytest.raises(ValueError, match="2 slots, expected 3"):
        tracker.update(np.array([True, False]))


def test_bucket_edges():
    assert bucket_edges(0, 32) == [0, 8]
    assert bucket_edges(100, 32) == [0, 8, 16, 32, 64, 128]
    assert bucket_edges(128, 32) == [0, 8, 16, 32, 64, 128, 256]
    assert bucket_edges(5, 2) == [0, 1, 2, 4, 8]  # N/4 < 1: starts at 1
    assert bucket_edges(100, 32, bucket_width=50) == [0, 50, 100, 150]


def test_summarize_by_hand():
    positions = np.array([1, 2, 9, 40, 41, 70])
    bits = np.array([4.0, 2.0, 3.0, 1.0, 5.0, 6.0])
    long_range = np.array([False, False, True, False, True, False])
    segments = np.array([0, 0, 0, 1, 1, 2])
    stats = summarize(positions, bits, long_range, segments, segment_length=32)
    assert stats["overall"] == {"tokens": 6, "bits_per_token": pytest.approx(3.5)}
    assert stats["long_range"] == {"tokens": 2, "bits_per_token": pytest.approx(4.0)}
    assert stats["rest"] == {"tokens": 4, "bits_per_token": pytest.approx(3.25)}
    assert stats["first_segment"]["bits_per_token"] == pytest.approx(3.0)
    assert stats["later_segments"]["bits_per_token"] == pytest.approx(4.0)
    rows = [(b["start"], b["end"], b["tokens"], b["bits_per_token"], b["long_range_tokens"]) for b in stats["buckets"]]
    assert rows == [(0, 8, 2, pytest.approx(3.0), 0), (8, 16, 1, pytest.approx(3.0), 1), (16, 32, 0, None, 0),
                    (32, 64, 2, pytest.approx(3.0), 1), (64, 128, 1, pytest.approx(6.0), 0)]
    assert stats["buckets"][2]["long_range_bits_per_token"] is None  # empty: null, not NaN
    empty = summarize(np.zeros(0), np.zeros(0), np.zeros(0, bool), np.zeros(0), segment_length=32)
    assert empty["overall"] == {"tokens": 0, "bits_per_token": None} and empty["buckets"] == []


# ----------------------------------------------------------------------------------------------
# the plot (matplotlib present) and its absence


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _legend(fig) -> list[str]:
    (ax,) = [a for a in fig.axes if a.get_legend() is not None]
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _curves(fig) -> dict:
    """The labelled lines of the plot, by the first words of their labels."""
    return {line.get_label().split(" (")[0].split(",")[0]: line
            for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")}


def _hide_matplotlib(monkeypatch) -> None:
    """`import matplotlib` fails from now on (until the test ends), as where it is not installed."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)


@needs_matplotlib
def test_png_file(report):
    import matplotlib.image

    plot = report["plot"]
    path = Path(plot["path"])
    assert path.name == PNG_NAME and path.parent.name == REPORT_DIR
    data = path.read_bytes()
    width, height = _png_size(data)
    assert (width, height) == (plot["width"], plot["height"])
    assert 640 <= width <= 2400 and 400 <= height <= 1600 and 1.2 < width / height < 2.5
    pixels = matplotlib.image.imread(io.BytesIO(data), format="png")  # matplotlib reads it back
    assert pixels.shape[:2] == (height, width) and pixels.shape[2] in (3, 4)
    assert pixels[..., :3].std() > 0.05  # a picture, not a blank page


@needs_matplotlib
def test_plot_figure_of_the_report(report):
    fig = plot_figure(report)
    ax = fig.axes[0]
    # one curve per series the report holds, each in the legend with its number
    legend = _legend(fig)
    assert len(legend) == 4, legend
    assert legend[0].startswith("all tokens") and f"{report['overall']['bits_per_token']:.3f}" in legend[0]
    assert legend[1].startswith("long-range tokens") and f"{report['long_range']['bits_per_token']:.3f}" in legend[1]
    assert legend[2].startswith("first segment") and legend[3].startswith("later segments")
    curves = _curves(fig)
    assert list(curves) == ["all tokens", "long-range tokens", "first segment of a document", "later segments"]
    expected = [np.nan if b["bits_per_token"] is None else b["bits_per_token"] for b in report["buckets"]]
    np.testing.assert_allclose(curves["all tokens"].get_ydata(), expected)
    middles = [(b["start"] + b["end"]) / 2 for b in report["buckets"]]
    np.testing.assert_allclose(curves["all tokens"].get_xdata(), middles)
    assert set(curves["first segment of a document"].get_ydata()) == {report["first_segment"]["bits_per_token"]}
    assert set(curves["later segments"].get_ydata()) == {report["later_segments"]["bits_per_token"]}
    # axes with units, a title naming the run, its step and the backend
    assert "bits/token" in ax.get_ylabel() and "position in the document (tokens" in ax.get_xlabel()
    assert ax.get_xscale() == "log"  # log-spaced buckets
    title = fig.get_suptitle()
    assert "report_run" in title and "step 3" in title and BACKEND in title
    assert type(fig.canvas).__name__ == "FigureCanvasAgg"


@needs_matplotlib
def test_plot_figure_variants(tmp_path):
    """Linear buckets, no long-range token, no later segment, and nothing at all still plot."""
    positions = np.array([1, 2, 9, 40, 41, 70])
    bits = np.array([4.0, 2.0, 3.0, 1.0, 5.0, 6.0])
    base = {"workdir": "runs/x", "step": 7, "recipe": None, "backend": "jax", "batches": 1, "batch_size": 2,
            "segment_length": 32, "documents_started": 2}
    linear = {**base, **summarize(positions, bits, np.zeros(6, bool), (positions - 1) // 32, 32, bucket_width=16)}
    fig = plot_figure(linear)
    assert fig.axes[0].get_xscale() == "linear"
    assert [t.split(" (")[0].split(",")[0] for t in _legend(fig)] == [
        "all tokens", "first segment of a document", "later segments"]  # no long-range token: no such curve
    assert "run (x)" in fig.get_suptitle() and "step 7" in fig.get_suptitle()
    first_only = {**base, **summarize(positions[:3], bits[:3], np.array([False, True, False]), np.zeros(3), 32)}
    assert [t.split(" (")[0].split(",")[0] for t in _legend(plot_figure(first_only))] == [
        "all tokens", "long-range tokens", "first segment of a document"]
    empty = {**base, **summarize(np.zeros(0), np.zeros(0), np.zeros(0, bool), np.zeros(0), 32)}
    assert "no scored tokens" in [t.get_text() for t in plot_figure(empty).axes[0].texts]
    for i, result in enumerate((linear, first_only, empty)):  # and each one renders
        plot = write_plot(result, tmp_path / f"{i}.png")
        assert _png_size((tmp_path / f"{i}.png").read_bytes()) == (plot["width"], plot["height"])


@needs_matplotlib
def test_write_plot_ignores_the_users_savefig_settings(tmp_path, report):
    import matplotlib

    with matplotlib.rc_context({"savefig.bbox": "tight", "savefig.dpi": 30, "savefig.format": "svg"}):
        plot = write_plot(report, tmp_path / "p.png")
    assert _png_size((tmp_path / "p.png").read_bytes()) == (plot["width"], plot["height"]) == (
        report["plot"]["width"], report["plot"]["height"])
    assert not list(tmp_path.glob(".*.tmp"))


def test_missing_matplotlib_is_one_line(monkeypatch):
    _hide_matplotlib(monkeypatch)
    with pytest.raises(PlotUnavailable) as info:
        plot_figure({})
    assert str(info.value) == f"plot skipped: matplotlib is not installed; for {PNG_NAME}: {PLOT_HINT}"
    assert PLOT_HINT == "pip install 'meliad[plot]'"


@needs_matplotlib
def test_broken_matplotlib_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(PlotUnavailable, match=r"^plot skipped: matplotlib could not be imported \(ModuleNotFound"):
        plot_figure({})


def test_report_without_matplotlib_writes_the_json_and_one_notice(trained, tmp_path, monkeypatch):
    _hide_matplotlib(monkeypatch)
    workdir = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", workdir / "checkpoints")
    out = io.StringIO()
    result = long_range_report(workdir, batches=2, out=out)
    assert result["plot"] is None and not (workdir / REPORT_DIR / PNG_NAME).exists()
    assert json.loads((workdir / REPORT_DIR / JSON_NAME).read_text()) == json.loads(json.dumps(result))
    lines = out.getvalue().splitlines()
    notices = [line for line in lines if "plot" in line and "skipped" in line]
    assert notices == [f"meliad: note: plot skipped: matplotlib is not installed; for {PNG_NAME}: {PLOT_HINT}"]
    assert "overall:" in out.getvalue() and PNG_NAME not in lines[-2]  # 'wrote' names the JSON only
    assert "Traceback" not in out.getvalue()


def test_cli_report_without_matplotlib(trained, tmp_path, monkeypatch, capsys):
    _hide_matplotlib(monkeypatch)
    workdir = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", workdir / "checkpoints")
    assert cli.run_cli(["report", str(workdir), "--batches", "2"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err and captured.err == ""
    assert sum("plot skipped" in line for line in captured.out.splitlines()) == 1
    assert "pip install 'meliad[plot]'" in captured.out
    assert (workdir / REPORT_DIR / JSON_NAME).is_file() and not (workdir / REPORT_DIR / PNG_NAME).exists()


# ----------------------------------------------------------------------------------------------
# errors and the command line


def test_no_checkpoint_is_a_report_error(tmp_path):
    with pytest.raises(ReportError, match="no intact checkpoint"):
        long_range_report(tmp_path, batches=1)


def _meliad(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}
    return subprocess.run([sys.executable, "-m", "meliad_core.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_cli_report_without_checkpoint_exits_2(tmp_path):
    for args in ([str(tmp_path)], [str(tmp_path / "missing")], [str(tmp_path), "--batches", "0"]):
        proc = _meliad("report", *args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("meliad: error: "), proc.stderr
    assert "no intact checkpoint" in _meliad("report", str(tmp_path)).stderr


def test_cli_report_in_process(trained, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", workdir / "checkpoints")
    assert cli.run_cli(["report", str(workdir), "--batches", "4", "--bucket-width", "48"]) == 0
    out = capsys.readouterr().out
    assert "overall:" in out and "bits/token" in out and "first segment" in out
    written = json.loads((workdir / REPORT_DIR / JSON_NAME).read_text())
    if HAS_MATPLOTLIB:
        assert Path(written["plot"]["path"]).is_file() and written["plot"]["path"] in out
    else:
        assert written["plot"] is None and "plot skipped" in out and "meliad[plot]" in out
    assert written["bucketing"] == "linear" and written["bucket_width"] == 48 and written["batches"] == 4
    assert [b["start"] for b in written["buckets"][:3]] == [0, 48, 96]
