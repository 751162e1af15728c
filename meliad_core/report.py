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
    long_range.png    bits/token vs position bucket: one line for all tokens, one for long-range tokens
                      (drawn with numpy and zlib: no plotting library is needed)

and prints a short summary. Bits are log2 of the model's probability, averaged over scored tokens
(bits/token = nats/token / ln 2), the same number as the eval metric `bits_per_token`.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

LOG2E = 1.0 / math.log(2.0)
REPORT_DIR = "report"
JSON_NAME = "long_range.json"
PNG_NAME = "long_range.png"
PLOT_SIZE = (720, 420)  # width, height in pixels
FORMAT = "meliad.long_range_report/1"


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
                      checkpoint: tuple | None = None, plot: bool = True) -> dict:
    """Makes the long-range report of the run in `workdir`; returns what it writes to long_range.json.

    `batches`: eval batches to stream (default: the recipe's eval.steps, or 10 if that is 0).
    `out`: where the summary is printed (default stdout). `bucket_width`: linear position buckets of
    this many tokens instead of log-spaced ones. `checkpoint`: a (path, manifest, arrays) tuple from
    `meliad_core.checkpoint.latest_valid_checkpoint` (default: read from `workdir`).
    Raises ReportError (one line) when there is no usable checkpoint. Keras must be importable with
    the backend to use already chosen (KERAS_BACKEND).
    """
    import keras

    from meliad_core import checkpoint as ckpt
    from meliad_core.config import RecipeError, validate_recipe
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
    if not isinstance(manifest.get("recipe"), dict):
        raise ReportError(f"{path}: the checkpoint's manifest holds no recipe")
    try:
        recipe = validate_recipe(manifest["recipe"])
    except RecipeError as exc:
        raise ReportError(f"{path}: the checkpoint's recipe is not valid here ({exc})") from None
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
            nats, valid, _ = token_losses(batch["tokens"], logits)
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
    report_dir = workdir / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
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
    if plot:
        width, height = PLOT_SIZE
        png = report_dir / PNG_NAME
        _atomic_write(png, render_plot(stats["buckets"], width, height, title=_plot_title(result)))
        result["plot"] = {"path": str(png), "width": width, "height": height}
    _atomic_write(report_dir / JSON_NAME, (json.dumps(result, indent=1) + "\n").encode())
    print(format_summary(result), file=out, flush=True)
    return result


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _bits(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_summary(result: dict) -> str:
    """The few lines `meliad report` prints."""
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
    written = [str(Path(result["workdir"]) / REPORT_DIR / JSON_NAME)]
    if result.get("plot"):
        written.append(result["plot"]["path"])
    lines.append("  wrote " + " and ".join(written))
    return "\n".join(lines)


def _plot_title(result: dict) -> str:
    return f"{result['recipe'] or 'run'} step {result['step']}: bits/token by position in document"


# ----------------------------------------------------------------------------------------------
# A line chart as a PNG, without a plotting library

# 3x5 glyphs, rows top to bottom, "1" = ink; text is drawn in upper case
_GLYPHS = {
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "Q": "010101101110011", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111", "0": "111101101101111", "1": "010110010010111",
    "2": "110001010100111", "3": "110001010001110", "4": "101101111001001", "5": "111100110001110",
    "6": "011100111101111", "7": "111001010010010", "8": "111101111101111", "9": "111101111001110",
    ".": "000000000000010", "-": "000000111000000", "/": "001001010100100", ":": "000010000010000",
    "(": "001010010010001", ")": "100010010010100", ",": "000000000010100", "=": "000111000111000",
    "[": "011010010010011", "]": "110010010010110", "_": "000000000000111", "+": "000010111010000",
    " ": "000000000000000",
}
WHITE, BLACK, GREY = (255, 255, 255), (40, 40, 40), (215, 215, 215)
BLUE, RED = (31, 119, 180), (214, 39, 40)


class Canvas:
    """An RGB pixel grid with lines, rectangles and 3x5 text; `png()` encodes it."""

    def __init__(self, width: int, height: int, background=WHITE):
        self.pixels = np.empty((height, width, 3), dtype=np.uint8)
        self.pixels[:] = background

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        """Fills [x0, x1] x [y0, y1] (inclusive, clipped)."""
        w, h = self.size
        x0, x1 = max(0, min(x0, x1)), min(w - 1, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(h - 1, max(y0, y1))
        if x0 <= x1 and y0 <= y1:
            self.pixels[y0:y1 + 1, x0:x1 + 1] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color, thickness: int = 1) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        lo, hi = -(thickness // 2), (thickness - 1) // 2
        for t in np.linspace(0.0, 1.0, steps + 1):
            x, y = int(round(x0 + (x1 - x0) * t)), int(round(y0 + (y1 - y0) * t))
            self.rect(x + lo, y + lo, x + hi, y + hi, color)

    def text(self, x: int, y: int, text: str, color=BLACK, scale: int = 2) -> None:
        """Draws `text` with its top-left corner at (x, y); unknown characters are left blank."""
        for i, char in enumerate(text.upper()):
            glyph = _GLYPHS.get(char, _GLYPHS[" "])
            for k, bit in enumerate(glyph):
                if bit == "1":
                    gx, gy = x + (i * 4 + k % 3) * scale, y + (k // 3) * scale
                    self.rect(gx, gy, gx + scale - 1, gy + scale - 1, color)

    @staticmethod
    def text_width(text: str, scale: int = 2) -> int:
        return max(len(text) * 4 - 1, 0) * scale

    def png(self) -> bytes:
        return encode_png(self.pixels)


def encode_png(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an (H, W, 3) uint8 array."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    height, width = pixels.shape[:2]
    raw = np.zeros((height, width * 3 + 1), dtype=np.uint8)  # filter byte 0 (none) on each row
    raw[:, 1:] = pixels.reshape(height, width * 3)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
            + chunk(b"IEND", b""))


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = max(span, 1e-9) / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def _short(position: int) -> str:
    if position >= 10_000 and position % 1000 == 0:
        return f"{position // 1000}K"
    return str(position)


def render_plot(buckets: list[dict], width: int = PLOT_SIZE[0], height: int = PLOT_SIZE[1], title: str = "") -> bytes:
    """PNG bytes: bits/token per position bucket (evenly spaced, labelled by their first position),
    one line for all tokens (blue) and one for long-range tokens (red)."""
    canvas = Canvas(width, height)
    left, right, top, bottom = 64, 16, 44, 56
    x_span, y_span = width - left - right, height - top - bottom
    series = [("all tokens", BLUE, [b["bits_per_token"] for b in buckets]),
              ("long-range tokens", RED, [b["long_range_bits_per_token"] for b in buckets])]
    values = [v for _, _, ys in series for v in ys if v is not None]
    y_max = max(values) if values else 1.0
    step = _nice_step(y_max)
    y_top = step * math.ceil(y_max / step + 1e-9) if values else 1.0
    y_top = max(y_top, step)

    def ypix(v: float) -> float:
        return top + y_span * (1.0 - v / y_top)

    n = max(len(buckets), 1)

    def xpix(i: float) -> float:
        return left + x_span * (i + 0.5) / n

    # grid, axes and y labels
    k = 0
    while k * step <= y_top + 1e-9:
        y = int(round(ypix(k * step)))
        canvas.rect(left, y, left + x_span, y, GREY)
        label = f"{k * step:g}"
        canvas.text(left - 6 - canvas.text_width(label), y - 5, label)
        k += 1
    canvas.rect(left, top, left, top + y_span, BLACK)
    canvas.rect(left, top + y_span, left + x_span, top + y_span, BLACK)
    # x labels: every bucket's first position, thinned so they do not overlap
    widest = max((canvas.text_width(_short(b["start"])) for b in buckets), default=0) + 8
    every = max(1, math.ceil(widest / max(x_span / n, 1)))
    for i, b in enumerate(buckets):
        x = int(round(left + x_span * i / n))
        canvas.rect(x, top + y_span, x, top + y_span + 4, BLACK)
        if i % every == 0:
            label = _short(b["start"])
            canvas.text(x - canvas.text_width(label) // 2, top + y_span + 8, label)
    canvas.text(left + (x_span - canvas.text_width("position in document (tokens)")) // 2, height - 20,
                "position in document (tokens)")
    canvas.text(8, 10, title[: (width - 16) // 8])
    canvas.text(8, 26, "bits/token")
    # the lines (points without tokens are skipped; their neighbours are joined)
    for _, color, ys in series:
        points = [(xpix(i), ypix(v)) for i, v in enumerate(ys) if v is not None]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            canvas.line(x0, y0, x1, y1, color, thickness=2)
        for x, y in points:
            canvas.rect(int(x) - 2, int(y) - 2, int(x) + 2, int(y) + 2, color)
    # legend, on the right of the second line
    x = width - right
    for name, color, _ in reversed(series):
        x -= canvas.text_width(name) + 26
        canvas.rect(x, 30, x + 18, 31, color)
        canvas.text(x + 22, 26, name)
        x -= 14
    return canvas.png()


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header; raises ValueError if `data` is not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])
