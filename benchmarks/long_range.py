"""Does the model use the far past? Trains XL, memorizing and block-recurrent models on the same data for
the same budget, over several seeds, then scores long-range tokens against the rest and bits/token by
position in the document, and reports each mechanism's gain over XL with its spread over seeds.

    python benchmarks/long_range.py --backend jax --jobs 2                # the recall demo triple, 3 seeds
    python benchmarks/long_range.py --recipes demos --task books \\
        --set "data.options.paths=../shared/data/books/*.txt"               # the books demo triple
    python benchmarks/long_range.py --recipes bundled --steps 500 --seeds 1  # the faithful *_tiny recipes
    python benchmarks/long_range.py --models xl memorizing --set model.num_layers=4 --workdir runs/long_range

Each (model, seed) is trained with `meliad_core.runner.run_training` in its own process and folder
(WORKDIR/<model>_s<seed>; a temporary folder unless --workdir is given, in which case a finished run is
reused and only re-scored, its training time read from the long_range_training.json its first pass
left there), then `meliad_core.report.long_range_report` streams --eval-batches batches of
a fresh eval stream through it (WORKDIR/<model>_s<seed>/report/ holds its JSON). The synthetic source
states a few facts at the top of each document and asks for them again later
(`data.options.min_recall_distance` characters at least); those recalled values are the long-range
tokens. A model whose context does not reach back that far can only guess them. Real text has no tags:
there the comparison is by position (the first segment of a document, where no mechanism has anything
to remember yet, against positions more than 2 segments in).

Recipes (--recipes):
  demos    recipes/demos/<task>_{xl,memorizing,recurrent} (--task recall, ledgers or books): one size, data, steps
           and seed per triple, with the options that let memory and recurrence learn at small budgets
           (docs/long_range.md). The default (auto) when they exist.
  bundled  the faithful transformer_xl_tiny, memorizing_tiny and block_recurrent_tiny.
  inline   the small ones defined below: 3 layers of width 64, segments of 128 bytes; XL with a 64-token
           window, a kNN memory of 2048 tokens on layer 1, or a 64-state recurrent layer on layer 1.
With --steps, train.steps (and the warmup, the checkpoint interval) are set here; without it the demo
recipes keep their own (the others: 500). eval.steps is 0 (the report does the evaluation), the seed is
train.seed, and --set overrides apply to every model.

Prints one row per model: the mean and the spread (sample standard deviation over seeds) of bits/token
overall, on long-range tokens, on the rest, on the first segment and beyond 2 segments, and the relative
gain vs XL (1 − model/XL, paired by seed) on long-range tokens and beyond 2 segments. Writes
WORKDIR/long_range_comparison.json and, with matplotlib (the `plot` extra), WORKDIR/long_range.png:
bits/token by position bucket, one curve per model (mean over seeds, shaded ± one standard deviation).
`--plot-from FILE.json` redraws that plot from a comparison JSON (needs only matplotlib and numpy).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

MODELS = ("xl", "memorizing", "recurrent")
BUNDLED = {"xl": "transformer_xl_tiny", "memorizing": "memorizing_tiny", "recurrent": "block_recurrent_tiny"}
TASKS = ("recall", "ledgers", "books")
COMPARISON_JSON, COMPARISON_PNG = "long_range_comparison.json", "long_range.png"
TIMING_JSON = "long_range_training.json"  # in each run folder: its training time, for a reused run
FORMAT = "meliad.long_range_comparison/1"


def demo_name(model: str, task: str) -> str:
    return f"demos/{task}_{model}"


def inline_mapping(model: str, args: argparse.Namespace) -> dict:
    """The recipe mapping of one model, defined here (no bundled recipe needed)."""
    n = args.segment_length
    mapping = {
        "name": f"{model}_long_range",
        "description": f"benchmarks/long_range.py: tiny {model} model on the synthetic ledgers",
        "model": {"num_layers": 3, "embed_dim": 64, "num_heads": 4, "head_dim": 16, "mlp_dim": 128,
                  "dropout": 0.0, "attn_dropout": 0.0},
        "attention": {"window": args.window},
        "data": {"source": "synthetic", "vocabulary": "bytes", "segment_length": n, "batch_size": args.batch_size,
                 "options": {"document_length": 2000}},
        "train": {"learning_rate": {"max": 0.01, "min": 0.001}},
    }
    if model == "memorizing":  # the memory layer needs window == segment length (spec §7.1)
        mapping["attention"]["window"] = n
        mapping["memory"] = {"layers": [-2], "size": args.memory_size, "neighbors": args.neighbors}
    elif model == "recurrent":
        mapping["recurrence"] = {"layers": [-2], "num_states": args.states, "gate": "fixed", "variant": "skip"}
    return mapping


def available(names) -> bool:
    from meliad_core import recipes
    from meliad_core.config import RecipeError

    try:
        for name in names:
            recipes.find_recipe(name)
    except RecipeError:
        return False
    return True


def bundled_available() -> bool:
    return available(BUNDLED.values())


def demos_available(task: str = "ledgers") -> bool:
    return available(demo_name(m, task) for m in MODELS)


def recipe_mapping(model: str, args: argparse.Namespace, source: str, seed: int | None = None) -> dict:
    from meliad_core.recipes import apply_override, resolve_recipe_mapping

    if source == "bundled":
        mapping = resolve_recipe_mapping(BUNDLED[model])
    elif source == "demos":
        mapping = resolve_recipe_mapping(demo_name(model, getattr(args, "task", "ledgers")))
    else:
        mapping = inline_mapping(model, args)
    steps = args.steps if args.steps is not None else (None if source == "demos" else 500)
    texts = []
    if steps is not None:
        texts += [f"train.steps={steps}", f"train.warmup={max(1, steps // 10)}", f"train.checkpoint_every={steps}",
                  f"train.log_every={max(1, steps // 5)}", f"eval.every={steps}"]
    texts.append("eval.steps=0")
    if seed is not None:
        texts.append(f"train.seed={seed}")
    for text in [*texts, *args.sets]:
        mapping = apply_override(mapping, text)
    return mapping


def positions(buckets: list[dict], start: int, end: int | None = None) -> dict:
    """Bits/token of the tokens at positions [start, end) (end None: to the end of the document), from a
    report's position buckets (log-spaced ones have edges at N/4, N/2, N, 2N, 4N, ...)."""
    for edge in (start, end):
        if edge is not None and any(b["start"] < edge < b["end"] and b["tokens"] for b in buckets):
            raise ValueError(f"a position bucket straddles {edge}: use log-spaced buckets")
    chosen = [b for b in buckets if b["tokens"] and b["start"] >= start and (end is None or b["end"] <= end)]
    tokens = sum(b["tokens"] for b in chosen)
    bits = sum(b["tokens"] * b["bits_per_token"] for b in chosen) / tokens if tokens else None
    return {"tokens": tokens, "bits_per_token": bits}


def beyond(report: dict, segments: int = 2) -> dict:
    """Bits/token of the tokens at positions >= `segments` x N (more than that many segments into a
    document)."""
    return positions(report["buckets"], segments * report["segment_length"])


def on_common_positions(runs: list[dict]) -> list[dict]:
    """When the models train on different segment lengths N, "first segment" and "beyond 2 segments"
    would cover different positions for each, so the paired gains would compare unlike tokens: they
    become positions < the smallest N (every model's first segment, or its start) and positions
    >= 2 x the largest N (beyond 2 segments for every model). Equal N: the runs as they are."""
    lengths = {r["segment_length"] for r in runs}
    if len(lengths) < 2:
        return runs
    first, later = min(lengths), 2 * max(lengths)
    return [{**r, "first_segment": positions(r["buckets"], 0, first),
             "beyond_2_segments": positions(r["buckets"], later)} for r in runs]


def training_timing(workdir: str, measured: dict, trained: bool) -> dict:
    """The training time of a run: `measured` when it trained now (kept in WORKDIR/TIMING_JSON), else
    (a finished run reused) the one kept when it trained, or None for each figure if none was kept."""
    path = os.path.join(workdir, TIMING_JSON)
    if trained:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(measured, f)
        return measured
    try:
        with open(path, encoding="utf-8") as f:
            kept = json.load(f)
    except (OSError, ValueError):
        kept = {}
    return {key: kept.get(key) for key in measured}


def one(model: str, seed: int, args: argparse.Namespace) -> dict:
    import keras

    from meliad_core.config import validate_recipe
    from meliad_core.report import long_range_report
    from meliad_core.runner import run_training

    recipe = validate_recipe(recipe_mapping(model, args, args.recipes, seed))
    workdir = os.path.join(args.workdir, f"{model}_s{seed}")
    load = _loadavg()
    start, cpu = time.perf_counter(), time.process_time()
    summary = run_training(recipe, workdir, out=sys.stderr)
    timing = {"train_seconds": time.perf_counter() - start, "train_cpu_seconds": time.process_time() - cpu,
              "load_before": load, "load_after": _loadavg()}
    timing = training_timing(workdir, timing, trained=summary.get("tokens_per_second") is not None)
    report = long_range_report(workdir, batches=args.eval_batches, out=sys.stderr, plot=False)
    train = summary.get("train") or {}
    return {"model": model, "seed": seed, "recipe": recipe.name, "backend": keras.backend.backend(),
            "steps": summary["step"], **timing, "tokens_per_s": train.get("tokens_per_second"),
            "batch": f"{recipe.data.batch_size}x{recipe.data.segment_length}",
            "overall": report["overall"], "long_range": report["long_range"], "rest": report["rest"],
            "first_segment": report["first_segment"], "later_segments": report["later_segments"],
            "beyond_2_segments": beyond(report), "segment_length": report["segment_length"],
            "buckets": report["buckets"], "report": os.path.join(workdir, "report")}


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


# ----------------------------------------------------------------------------------------------
# Statistics over seeds


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def mean_sd(values) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than 2 values) of the non-None values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt(stat: tuple, percent: bool = False) -> str:
    mean, sd = stat
    if mean is None:
        return "-"
    if percent:
        return f"{100 * mean:+.1f}%" + ("" if sd is None else f" ± {100 * sd:.1f}")
    return f"{mean:.3f}" + ("" if sd is None else f" ± {sd:.3f}")


def gain(run: dict, xl: dict | None, key: str) -> float | None:
    """Relative gain vs XL (1 − model/XL) on category `key`, for runs of the same seed."""
    if xl is None:
        return None
    ours, theirs = run[key]["bits_per_token"], xl[key]["bits_per_token"]
    if ours is None or not theirs:
        return None
    return 1.0 - ours / theirs


def compare(runs: list[dict]) -> list[dict]:
    """One summary per model: mean/sd of each category and of the paired gains vs XL."""
    xl = {r["seed"]: r for r in runs if r["model"] == "xl"}
    rows = []
    for model in MODELS:
        mine = [r for r in runs if r["model"] == model]
        if not mine:
            continue
        row = {"model": model, "recipe": mine[0]["recipe"], "seeds": [r["seed"] for r in mine],
               "steps": mine[0]["steps"], "batch": mine[0]["batch"]}
        for key in ("overall", "long_range", "rest", "first_segment", "beyond_2_segments"):
            row[key] = mean_sd([r[key]["bits_per_token"] for r in mine])
        row["long_range_tokens"] = mean_sd([r["long_range"]["tokens"] for r in mine])[0]
        for key in ("train_seconds", "train_cpu_seconds"):
            row[key] = mean_sd([r[key] for r in mine])
        for key in ("long_range", "rest", "first_segment", "beyond_2_segments"):
            row[f"gain_{key}"] = (None, None) if model == "xl" else mean_sd(
                [gain(r, xl.get(r["seed"]), key) for r in mine])
        rows.append(row)
    return rows


def mean_curves(runs: list[dict]) -> dict:
    """Per model: the bucket starts/ends and the mean and sd over seeds of bits/token in each bucket."""
    curves = {}
    for model in MODELS:
        mine = [r for r in runs if r["model"] == model]
        if not mine:
            continue
        spans = sorted({(b["start"], b["end"]) for r in mine for b in r["buckets"] if b["tokens"]})
        points = []
        for start, end in spans:
            values = [b["bits_per_token"] for r in mine for b in r["buckets"]
                      if (b["start"], b["end"]) == (start, end) and b["tokens"]]
            mean, sd = mean_sd(values)
            points.append({"start": start, "end": end, "mean": mean, "sd": sd or 0.0, "seeds": len(values)})
        curves[model] = points
    return curves


# ----------------------------------------------------------------------------------------------
# The plot (matplotlib optional, as in meliad_core/report.py, whose loader it uses)


def write_plot(comparison: dict, path: str) -> str:
    from meliad_core.report import load_matplotlib

    """bits/token by position bucket, one curve per model (mean over seeds ± one sd); returns `path`."""
    _, Figure, FigureCanvasAgg = load_matplotlib(COMPARISON_PNG)
    from matplotlib.ticker import ScalarFormatter
    figure = Figure(figsize=(9.0, 5.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    n = comparison.get("segment_length") or 1
    for model, points in comparison["curves"].items():
        points = [p for p in points if p["mean"] is not None]
        if not points:
            continue
        x = [(p["start"] + p["end"]) / 2 for p in points]
        y = [p["mean"] for p in points]
        seeds = max(p["seeds"] for p in points)
        axes.plot(x, y, marker="o", label=f"{model} ({seeds} seed{'s' if seeds > 1 else ''})")
        axes.fill_between(x, [m - p["sd"] for m, p in zip(y, points)], [m + p["sd"] for m, p in zip(y, points)],
                          alpha=0.2)
    axes.axvline(2 * n, color="grey", linestyle=":", linewidth=1)
    axes.text(2 * n, axes.get_ylim()[1], " 2 segments", va="top", fontsize=8, color="grey")
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.set_xlabel("position in the document (tokens, middle of the bucket)")
    axes.set_ylabel("bits/token")
    axes.set_title(comparison.get("title", "bits/token by position"), fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_or_note(comparison: dict, path: str) -> str:
    """Writes the plot; returns the line to print (where it went, or why it was skipped)."""
    from meliad_core.report import PlotUnavailable

    try:
        return f"plot: {write_plot(comparison, path)}"
    except PlotUnavailable as exc:
        return f"note: {exc}"


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("jax", "torch", "tensorflow"),
                        default=os.environ.get("KERAS_BACKEND", "jax"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3],
                        help="train.seed of each run; every model runs every seed (default 1 2 3)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run (default: the demo recipes' own, else 500)")
    parser.add_argument("--eval-batches", type=int, default=48, help="eval batches the report streams (default 48)")
    parser.add_argument("--recipes", choices=("auto", "demos", "bundled", "inline"), default="auto",
                        help="the demo triple if present (auto), the faithful tiny recipes, or the inline ones")
    parser.add_argument("--task", choices=TASKS, default="recall", help="demos: which triple (default recall)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each in its own process (default 1; timings then share the CPU)")
    parser.add_argument("--segment-length", type=int, default=128, help="inline recipes: data.segment_length")
    parser.add_argument("--window", type=int, default=64, help="inline recipes: attention.window of xl and recurrent")
    parser.add_argument("--batch-size", type=int, default=4, help="inline recipes: data.batch_size")
    parser.add_argument("--memory-size", type=int, default=2048, help="inline recipes: memory.size")
    parser.add_argument("--neighbors", type=int, default=32, help="inline recipes: memory.neighbors")
    parser.add_argument("--states", type=int, default=64, help="inline recipes: recurrence.num_states")
    parser.add_argument("--workdir", default=None,
                        help="keep the runs in WORKDIR/<model>_s<seed> (default: a temporary folder)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for every model (repeatable)")
    parser.add_argument("--plot-from", metavar="JSON", help="only redraw the plot of a comparison JSON, beside it")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plot_from:
        with open(args.plot_from, encoding="utf-8") as f:
            comparison = json.load(f)
        print(plot_or_note(comparison, os.path.join(os.path.dirname(os.path.abspath(args.plot_from)), COMPARISON_PNG)))
        return
    if (args.steps is not None and args.steps < 1) or args.eval_batches < 1 or args.jobs < 1:
        parser.error("--steps, --eval-batches and --jobs must be positive")
    if args.one:
        print(json.dumps(one(args.one, args.seed, args)))
        return
    from _common import machine, print_table

    if args.recipes == "auto":
        args.recipes = ("demos" if demos_available(args.task) else "bundled" if bundled_available() else "inline")
    names = {"demos": lambda m: demo_name(m, args.task), "bundled": BUNDLED.get}.get(args.recipes)
    command = f"python benchmarks/long_range.py {' '.join(sys.argv[1:])}"
    print(f"command: {command}")
    print(f"machine: {machine()}")
    print(f"load average at start: {_loadavg()}")
    print(f"recipes: {args.recipes}" + (f" ({', '.join(names(m) for m in args.models)})" if names
                                        else " (defined in benchmarks/long_range.py)"))
    workdir = args.workdir or tempfile.mkdtemp(prefix="meliad_long_range_")
    os.makedirs(workdir, exist_ok=True)
    env = {**os.environ, "KERAS_BACKEND": args.backend}
    shared = ["--eval-batches", str(args.eval_batches), "--recipes", args.recipes, "--task", args.task,
              "--segment-length", str(args.segment_length), "--window", str(args.window), "--batch-size",
              str(args.batch_size), "--memory-size", str(args.memory_size), "--neighbors", str(args.neighbors),
              "--states", str(args.states), "--workdir", workdir]
    if args.steps is not None:
        shared += ["--steps", str(args.steps)]
    for text in args.sets:
        shared += ["--set", text]
    runs, failures = [], []

    def train_one(model: str, seed: int) -> None:
        proc = subprocess.run([sys.executable, __file__, "--one", model, "--seed", str(seed), *shared],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            failures.append([model, str(seed), f"failed: {tail[:100]}"])
            return
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(f"  {model} seed {seed}: {run['steps']} steps, {_seconds(run['train_seconds'])} s "
              f"({_seconds(run['train_cpu_seconds'])} s CPU, load {run['load_before']} -> {run['load_after']}), "
              f"long-range {_bits(run['long_range'])}, rest {_bits(run['rest'])}, "
              f"first segment {_bits(run['first_segment'])}, beyond 2 {_bits(run['beyond_2_segments'])}",
              flush=True)

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for job in [pool.submit(train_one, model, seed) for seed in args.seeds for model in args.models]:
                job.result()
        order = [(model, seed) for seed in args.seeds for model in args.models]
        runs.sort(key=lambda run: order.index((run["model"], run["seed"])))  # as --jobs 1 would list them
        lengths = sorted({run["segment_length"] for run in runs})
        runs = on_common_positions(runs)
        rows = compare(runs)
        comparison = {"format": FORMAT, "command": command, "machine": machine(), "recipes": args.recipes,
                      "task": args.task if args.recipes == "demos" else None,
                      "segment_length": lengths[-1] if lengths else None,
                      "segment_lengths": lengths,
                      "title": f"bits/token by position: {args.recipes}"
                               + (f" {args.task}" if args.recipes == "demos" else "")
                               + f", seeds {' '.join(map(str, args.seeds))}",
                      "summary": rows, "curves": mean_curves(runs),
                      "runs": [{k: v for k, v in r.items() if k != "buckets"} for r in runs]}
        with open(os.path.join(workdir, COMPARISON_JSON), "w", encoding="utf-8") as f:
            json.dump(comparison, f, indent=1)
        plot_line = plot_or_note(comparison, os.path.join(workdir, COMPARISON_PNG))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    table = []
    for row in rows:
        table.append([row["model"], row["recipe"], args.backend, row["batch"], str(row["steps"]),
                      " ".join(map(str, row["seeds"])), _seconds(row["train_seconds"][0]),
                      _seconds(row["train_cpu_seconds"][0]), fmt(row["overall"]),
                      fmt(row["long_range"]) + f" ({row['long_range_tokens']:,.0f})", fmt(row["rest"]),
                      fmt(row["first_segment"]), fmt(row["beyond_2_segments"]),
                      fmt(row["gain_long_range"], percent=True), fmt(row["gain_rest"], percent=True),
                      fmt(row["gain_first_segment"], percent=True), fmt(row["gain_beyond_2_segments"], percent=True)])
    for model, seed, why in failures:
        table.append([model, "-", args.backend, "-", "-", seed, *["-"] * 10, why])
    print_table(["model", "recipe", "backend", "batch", "steps", "seeds", "train s", "CPU s", "bits/tok",
                 "long-range bits/tok (tokens)", "rest bits/tok", "first segment", "beyond 2 segments",
                 "gain long-range", "gain rest", "gain first segment", "gain beyond 2 segments"], table)
    if len(lengths) > 1:
        print(f"segment lengths differ ({', '.join(map(str, lengths))}): first segment = positions < "
              f"{lengths[0]}, beyond 2 segments = positions >= {2 * lengths[-1]}, for every model")
    print(f"mean ± sample sd over seeds; gain = 1 − model/XL, paired by seed (positive: fewer bits than XL); "
          f"eval: {args.eval_batches} batches of a fresh eval stream per run; long-range = tagged tokens "
          "(the synthetic ledgers' recalled facts); beyond 2 segments = positions >= 2N in a document; "
          "train s / CPU s = wall and process time of training per run (mean)")
    print(plot_line if args.workdir else "plot: not kept (no --workdir)")
    print(f"load average at end: {_loadavg()}")
    if failures:
        sys.exit(1)


def _bits(category: dict) -> str:
    value = category["bits_per_token"]
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
