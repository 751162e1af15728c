"""The long-range report: bits per token by position in the document, and on long-range tokens.

    meliad report runs/x                      # after `meliad run ... --workdir runs/x`
    meliad report runs/x --batches 200 --bucket-width 512

    from meliad_core.report import long_range_report
    result = long_range_report("runs/x", batches=50)          # the dict written to long_range.json

It loads the weights of the run's newest intact checkpoint into a fresh model, streams `batches`
batches of a *fresh* eval stream (from the first document, with empty caches, memories and states)
through the model's eval stream, and scores every token as the loss does (`token_losses`). Each batch
slot's position in its current document is tracked (it restarts where `start_of_sequence` is set):
the position of a scored token is `segment index in its document * N + offset in the segment`, counted
for the *target* token (the loss for token t is predicted at position t-1; position 0 and the first
token of every later segment are never scored, spec §10.3).

It writes, under WORKDIR/report/:

    long_range.json   overall bits/token; bits/token on long-range tokens (batch["long_range"], e.g.
                      the recalled facts of the synthetic source) and on the rest, with their counts;
                      the document's first segment vs its later segments; and per position bucket
                      (log-spaced by default: [0, N/4), [N/4, N/2), [N/2, N), [N, 2N), [2N, 4N), ...;
                      or linear buckets of `bucket_width` tokens) the count and bits/token of all
                      tokens and of long-range tokens. Categories without tokens have null bits/token.
    long_range.png    a matplotlib plot (Agg, no display needed) of bits/token vs position in the document
                      (tokens, at the middle of each bucket): one curve for all tokens, one for long-range
                      tokens, and the means of the first segment and of the later segments. Needs the
                      `plot` extra (pip install 'meliad[plot]'); without matplotlib the JSON is still
                      written and one line says that the plot was skipped.

and prints a short summary. Bits are log2 of the model's probability, averaged over scored tokens
(bits/token = nats/token / ln 2), the same number as the eval metric `bits_per_token`.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from meliad_core.units import LOG2E, one_line

REPORT_DIR = "report"
JSON_NAME = "long_range.json"
PNG_NAME = "long_range.png"
PLOT_INCHES, PLOT_DPI = (9.0, 5.0), 120  # 1080 x 600 pixels
FORMAT = "meliad.long_range_report/1"
PLOT_HINT = "pip install 'meliad[plot]'"


class ReportError(RuntimeError):
    """A report that cannot be made (no checkpoint, an unusable one); the message is one line."""


# ----------------------------------------------------------------------------------------------
# Positions in documents


class DocumentPositions:
    """Where each batch slot is in its current document, from the `start_of_sequence` flags.

    `update(start_of_sequence)` is called once per batch, in stream order, and returns the (B, N)
    positions in their documents of the *target* tokens that the loss scores at each position:
    `segment * N + offset + 1`, where `segment` counts the slot's segments since its document started
    (0 on a `start_of_sequence` segment). A slot whose first batch has no start flag (a stream picked
    up mid-document) counts from that batch, as if it were a document's first segment.
    """

    def __init__(self, batch_size: int, segment_length: int):
        self.segment_length = int(segment_length)
        self.segments = np.full((int(batch_size),), -1, dtype=np.int64)

    def update(self, start_of_sequence) -> np.ndarray:
        start = np.asarray(start_of_sequence, dtype=bool).reshape(-1)
        if start.shape != self.segments.shape:
            raise ValueError(f"start_of_sequence has {start.size} slots, expected {self.segments.size}")
        self.segments = np.where(start, 0, self.segments + 1)
        offsets = np.arange(1, self.segment_length + 1, dtype=np.int64)
        return self.segments[:, None] * self.segment_length + offsets[None, :]


# ----------------------------------------------------------------------------------------------
# Summaries of scored tokens


def bucket_edges(max_position: int, segment_length: int, bucket_width: int | None = None) -> list[int]:
    """Bucket boundaries [e0=0, e1, ...] covering positions 0..max_position.

    Linear buckets of `bucket_width` tokens, or (None) log-spaced ones: 0, N/4, N/2, N, 2N, 4N, ...
    """
    max_position = max(int(max_position), 0)
    if bucket_width is not None:
        if bucket_width < 1:
            raise ValueError(f"bucket_width: got {bucket_width}, expected a positive number of tokens")
        count = max_position // bucket_width + 1
        return [i * bucket_width for i in range(count + 1)]
    edges, edge = [0], max(1, segment_length // 4)
    while edges[-1] <= max_position:
        edges.append(edge)
        edge *= 2
    return edges


def _category(bits: np.ndarray) -> dict:
    count = int(bits.size)
    return {"tokens": count, "bits_per_token": float(bits.mean()) if count else None}


def summarize(positions: np.ndarray, bits: np.ndarray, long_range: np.ndarray, segments: np.ndarray,
              segment_length: int, bucket_width: int | None = None) -> dict:
    """The statistics of the report from flat arrays over the scored tokens (one entry each)."""
    positions = np.asarray(positions, dtype=np.int64)
    bits = np.asarray(bits, dtype=np.float64)
    long_range = np.asarray(long_range, dtype=bool)
    segments = np.asarray(segments, dtype=np.int64)
    edges = bucket_edges(int(positions.max()) if positions.size else 0, segment_length, bucket_width)
    index = np.searchsorted(np.asarray(edges), positions, side="right") - 1
    buckets = []
    for i in range(len(edges) - 1):
        inside = index == i
        everything, ranged = _category(bits[inside]), _category(bits[inside & long_range])
        buckets.append({"start": edges[i], "end": edges[i + 1], "tokens": everything["tokens"],
                        "bits_per_token": everything["bits_per_token"], "long_range_tokens": ranged["tokens"],
                        "long_range_bits_per_token": ranged["bits_per_token"]})
    while buckets and buckets[-1]["tokens"] == 0:
        buckets.pop()
    return {
        "overall": _category(bits),
        "long_range": _category(bits[long_range]),
        "rest": _category(bits[~long_range]),
        "first_segment": _category(bits[segments == 0]),
        "later_segments": _category(bits[segments > 0]),
        "bucketing": "linear" if bucket_width is not None else "log",
        "bucket_width": bucket_width,
        "buckets": buckets,
        "max_position": int(positions.max()) if positions.size else 0,
    }


# ----------------------------------------------------------------------------------------------
# The report


def _model_inputs(batch: dict) -> dict:
    return {"tokens": batch["tokens"], "start_of_sequence": batch["start_of_sequence"]}


def long_range_report(workdir, batches: int | None = None, out=None, *, bucket_width: int | None = None,
                      checkpoint: tuple | None = None, plot: bool = True, folder: str | None = None) -> dict:
    """Makes the long-range report of the run in `workdir`; returns what it writes to long_range.json.

    `batches`: eval batches to stream (default: the recipe's eval.steps, or 10 if that is 0).
    `out`: where the summary is printed (default stdout). `bucket_width`: linear position buckets of
    this many tokens instead of log-spaced ones. `checkpoint`: a (path, manifest, arrays) tuple from
    `meliad_core.checkpoint.latest_valid_checkpoint` (default: read from `workdir`). `folder`: where
    under `workdir` the report goes (default REPORT_DIR).
    Raises ReportError (one line) when there is no usable checkpoint. Keras must be importable with
    the backend to use already chosen (KERAS_BACKEND).
    """
    import keras

    from meliad_core import checkpoint as ckpt
    from meliad_core.data import stream
    from meliad_core.model import build_model, token_losses

    out = out if out is not None else sys.stdout
    workdir = Path(workdir)
    if batches is not None and batches < 1:
        raise ReportError(f"batches: got {batches}, expected a positive number of eval batches")
    if bucket_width is not None and bucket_width < 1:
        raise ReportError(f"bucket width: got {bucket_width}, expected a positive number of tokens")
    if checkpoint is None:
        checkpoint = ckpt.latest_valid_checkpoint(workdir, warn=lambda m: print(f"meliad: warning: {m}", file=out))
    if checkpoint is None:
        raise ReportError(f"{workdir}: no intact checkpoint found there; train first with 'meliad run'")
    path, manifest, arrays = checkpoint
    try:
        recipe = ckpt.stored_recipe(path, manifest)
    except ckpt.CheckpointError as exc:
        raise ReportError(str(exc)) from None
    if batches is None:
        batches = recipe.eval.steps or 10

    model = build_model(recipe, streams=("eval",))  # only the eval stream: no state kept for the others
    try:
        ckpt.restore(model, None, manifest, arrays, weights_only=True)
    except ckpt.CheckpointError as exc:
        raise ReportError(str(exc)) from None
    data = stream(recipe, split="eval")
    B, N = recipe.data.batch_size, recipe.data.segment_length
    tracker = DocumentPositions(B, N)
    keep_positions, keep_bits, keep_long, keep_segments = [], [], [], []
    documents = 0
    with model.inference_stream("eval"):
        for _ in range(batches):
            batch = next(data)
            positions = tracker.update(batch["start_of_sequence"])
            documents += int(np.count_nonzero(batch["start_of_sequence"]))
            # the model's own traced inference function on its eval stream (the model keeps no other)
            logits = model.predict_on_batch(_model_inputs(batch))
            nats, valid, _ = token_losses(batch["tokens"], logits, model.loss_mask_ids)  # as the eval metric
            nats = np.asarray(keras.ops.convert_to_numpy(nats), dtype=np.float64)
            valid = np.asarray(keras.ops.convert_to_numpy(valid)) > 0
            # position j predicts token j + 1: its long-range flag is the next token's
            target_long = np.concatenate([batch["long_range"][:, 1:], np.zeros((B, 1), bool)], axis=1)
            keep_positions.append(positions[valid])
            keep_bits.append(nats[valid] * LOG2E)
            keep_long.append(target_long[valid])
            keep_segments.append(np.broadcast_to(tracker.segments[:, None], (B, N))[valid])

    stats = summarize(np.concatenate(keep_positions), np.concatenate(keep_bits), np.concatenate(keep_long),
                      np.concatenate(keep_segments), N, bucket_width)
    result = {
        "format": FORMAT,
        "workdir": str(workdir),
        "checkpoint": str(path),
        "step": int(manifest.get("step", 0)),
        "recipe": recipe.name,
        "backend": keras.backend.backend(),
        "batches": int(batches),
        "batch_size": B,
        "segment_length": N,
        "window": recipe.attention.window,
        "documents_started": documents,
        **stats,
        "plot": None,
    }
    return write_report(result, workdir / (folder or REPORT_DIR), out, plot=plot)


def write_report(result: dict, folder: Path, out=None, plot: bool = True) -> dict:
    """Writes a report's `result` to folder/long_range.json (and its plot, when matplotlib is there) and
    prints its summary to `out` (default stdout). Returns `result`, with the plot's entry filled in."""
    out = out if out is not None else sys.stdout
    folder.mkdir(parents=True, exist_ok=True)
    skipped = None
    if plot:
        try:
            result["plot"] = write_plot(result, folder / PNG_NAME)
        except PlotUnavailable as exc:
            skipped = str(exc)
    _atomic_write(folder / JSON_NAME, (json.dumps(result, indent=1) + "\n").encode())
    print(format_summary(result, folder), file=out, flush=True)
    if skipped:
        print(f"meliad: note: {skipped}", file=out, flush=True)
    return result


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _bits(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_summary(result: dict, folder: Path | None = None) -> str:
    """The few lines `meliad report` prints; `folder`: where the report was written (default: the
    run's REPORT_DIR)."""
    o, lr, rest = result["overall"], result["long_range"], result["rest"]
    first, later = result["first_segment"], result["later_segments"]
    lines = [f"long-range report of {result['workdir']} (step {result['step']}, {result['recipe'] or 'recipe'}, "
             f"{result['backend']}): {result['batches']} eval batches of {result['batch_size']} x "
             f"{result['segment_length']} tokens, {o['tokens']:,} scored tokens, "
             f"{result['documents_started']} documents started",
             f"  overall: {_bits(o['bits_per_token'])} bits/token"]
    if lr["tokens"]:
        lines.append(f"  long-range tokens: {_bits(lr['bits_per_token'])} bits/token vs "
                     f"{_bits(rest['bits_per_token'])} on the rest ({lr['tokens']:,} vs {rest['tokens']:,} tokens)")
    else:
        lines.append(f"  long-range tokens: none in these {result['batches']} batches (stream more with --batches)")
    if later["tokens"]:
        lines.append(f"  first segment of a document: {_bits(first['bits_per_token'])} bits/token vs "
                     f"{_bits(later['bits_per_token'])} on later segments")
    else:
        lines.append(f"  first segment of a document: {_bits(first['bits_per_token'])} bits/token "
                     "(no later segments in these batches)")
    shown = result["buckets"][:12]
    cells = [f"[{b['start']},{b['end']}) {_bits(b['bits_per_token'])}"
             + (f"/{_bits(b['long_range_bits_per_token'])}" if b["long_range_tokens"] else "") for b in shown]
    more = f" ... ({len(result['buckets']) - len(shown)} more)" if len(result["buckets"]) > len(shown) else ""
    lines.append("  by position (all/long-range bits/token): " + "  ".join(cells) + more)
    written = [str((folder if folder is not None else Path(result["workdir"]) / REPORT_DIR) / JSON_NAME)]
    if result.get("plot"):
        written.append(result["plot"]["path"])
    lines.append("  wrote " + " and ".join(written))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The plot (matplotlib, the optional `plot` extra)


class PlotUnavailable(RuntimeError):
    """matplotlib cannot be imported; the message is the one line the report prints instead of a plot."""


def load_matplotlib(png_name: str = PNG_NAME):
    """The `matplotlib` module, the Figure class and the Agg canvas; raises PlotUnavailable when missing
    (its message names `png_name`, the picture that is skipped).

    Only the object-oriented API is used: pyplot (the user's interactive backend and its global list
    of figures) is never touched, and the Agg canvas needs no display.
    """
    try:
        import matplotlib  # first, so that a `matplotlib` blocked in sys.modules counts as missing
        import matplotlib.style
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        reason = ("matplotlib is not installed" if exc.name == "matplotlib"
                  else f"matplotlib could not be imported ({one_line(exc)})")
        raise PlotUnavailable(f"plot skipped: {reason}; for {png_name}: {PLOT_HINT}") from None
    return matplotlib, Figure, FigureCanvasAgg


def _position(value: float) -> str:
    value = int(round(value))
    return f"{value // 1000}K" if value >= 10_000 and value % 1000 == 0 else str(value)


def plot_title(result: dict) -> str:
    """The run (recipe and work directory), its step and the backend."""
    name, where = result.get("recipe") or "run", Path(result["workdir"]).name
    run = name if where in ("", name) else f"{name} ({where})"
    return f"Long-range report: {run}, step {result['step']}, {result['backend']} backend"


def plot_figure(result: dict):
    """A matplotlib Figure (Agg canvas) of bits/token by position in the document for a report dict.

    Curves, each in the legend with its overall mean: all tokens and long-range tokens (when the
    eval batches held any) per position bucket, drawn at the middle of the bucket; the mean of the
    first segment of a document over positions [.., N] and of the later segments beyond N.
    The x axis is logarithmic (base 2) for log-spaced buckets, linear for `bucket_width` ones.
    Raises PlotUnavailable when matplotlib cannot be imported.
    """
    matplotlib, Figure, FigureCanvasAgg = load_matplotlib()
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    buckets, N = result["buckets"], int(result["segment_length"])
    log_x = result["bucketing"] == "log" and bool(buckets)
    middles = np.array([(b["start"] + b["end"]) / 2 for b in buckets], dtype=np.float64)

    def series(key: str) -> np.ndarray:  # empty buckets are gaps (NaN), not zeros
        return np.array([np.nan if b[key] is None else b[key] for b in buckets], dtype=np.float64)

    if log_x:
        left, right = middles[0] / 2, float(buckets[-1]["end"])
    else:
        left, right = 0.0, float(buckets[-1]["end"] if buckets else N)
    first, later = result["first_segment"], result["later_segments"]
    with matplotlib.style.context("default"):  # the same picture whatever the user's matplotlibrc says
        fig = Figure(figsize=PLOT_INCHES, dpi=PLOT_DPI, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xlim(left, right)
        ax.axvspan(left, min(N, right), color="0.93", zorder=0, lw=0)  # the first segment of a document
        ax.plot(middles, series("bits_per_token"), marker="o", lw=2, color="tab:blue",
                label=f"all tokens ({_bits(result['overall']['bits_per_token'])} bits/token overall)")
        if result["long_range"]["tokens"]:
            ax.plot(middles, series("long_range_bits_per_token"), marker="s", lw=2, color="tab:red",
                    label=f"long-range tokens ({_bits(result['long_range']['bits_per_token'])} bits/token overall)")
        if first["tokens"]:
            ax.plot([left, min(N, right)], [first["bits_per_token"]] * 2, ls="--", lw=1.5, color="0.3",
                    label=f"first segment of a document, positions 1-{N} (mean {_bits(first['bits_per_token'])})")
        if later["tokens"] and right > N:
            ax.plot([N, right], [later["bits_per_token"]] * 2, ls=":", lw=2, color="tab:green",
                    label=f"later segments, positions > {N} (mean {_bits(later['bits_per_token'])})")
        if not buckets:
            ax.text(0.5, 0.5, "no scored tokens", transform=ax.transAxes, ha="center", va="center")
        if log_x:
            ax.xaxis.set_major_locator(FixedLocator([b["end"] for b in buckets]))
            ax.xaxis.set_minor_locator(NullLocator())
        else:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _position(x)))
        heights = [y for line in ax.get_lines() for y in np.asarray(line.get_ydata(), dtype=np.float64)
                   if np.isfinite(y)]
        ax.set_ylim(0, max(heights) * 1.12 if heights and max(heights) > 0 else None)  # room for the legend
        ax.grid(True, color="0.85", lw=0.8)
        ax.set_axisbelow(True)
        ax.set_xlabel(f"position in the document (tokens; {result['bucketing']}-spaced buckets, each at its "
                      f"middle; shaded: the first segment, {N} tokens)")
        ax.set_ylabel("bits/token (lower is better)")
        ax.set_title(f"{result['batches']} eval batches of {result['batch_size']} x {N} tokens, "
                     f"{result['overall']['tokens']:,} scored tokens, {result['documents_started']} documents "
                     "started", fontsize="medium", color="0.3")
        fig.suptitle(plot_title(result), fontsize="large", fontweight="bold")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small", framealpha=0.9)
    return fig


def write_plot(result: dict, path) -> dict:
    """Writes the PNG of `plot_figure(result)` to `path` (atomically); returns {"path", "width", "height"}.
    Raises PlotUnavailable when matplotlib cannot be imported (nothing is written then)."""
    fig = plot_figure(result)
    matplotlib = load_matplotlib()[0]
    buffer = io.BytesIO()
    with matplotlib.style.context("default"):
        fig.canvas.print_png(buffer)  # the figure's own size and dpi (no savefig.* rc settings)
    width, height = fig.canvas.get_width_height()
    _atomic_write(Path(path), buffer.getvalue())
    return {"path": str(path), "width": int(width), "height": int(height)}
