"""Does the model use the far past? Trains tiny XL, memorizing and block-recurrent models on the
synthetic ledgers for the same budget, then scores long-range tokens (recalled facts) against the rest.

    python benchmarks/long_range.py --backend jax                       # about 3 minutes on 2 CPU cores
    python benchmarks/long_range.py --steps 2000 --eval-batches 64 --workdir runs/long_range
    python benchmarks/long_range.py --models xl memorizing --set model.num_layers=4

Each model is trained with `meliad_core.runner.run_training` in its own process and folder
(WORKDIR/<model>; a temporary folder unless --workdir is given, in which case a finished run is reused
and only re-scored), then `meliad_core.report.long_range_report` streams --eval-batches batches of a
fresh eval stream through it (WORKDIR/<model>/report/ holds its JSON and plot). The synthetic source
states a few facts at the top of each document and asks for them again at least 512 characters later
(`data.options.min_recall_distance`); those recalled values are the long-range tokens. A model whose
context does not reach back that far can only guess them.

The recipes are the bundled `transformer_xl_tiny`, `memorizing_tiny` and `block_recurrent_tiny` when
all three exist (--recipes auto), or the small ones defined below (--recipes inline): 3 layers of width
64, segments of 128 bytes; XL with a 64-token window (its cache reaches about 3 x 64 tokens back), a
kNN memory of 2048 tokens on layer 1, or a 64-state recurrent layer on layer 1. Either way
train.steps, train.warmup, the checkpoint interval and eval.steps (0: the report does the evaluation)
are set here, and --set overrides apply to every model.
"""

from __future__ import annotations

import argparse
import json
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


def bundled_available() -> bool:
    from meliad_core import recipes
    from meliad_core.config import RecipeError

    try:
        for name in BUNDLED.values():
            recipes.find_recipe(name)
    except RecipeError:
        return False
    return True


def recipe_mapping(model: str, args: argparse.Namespace, source: str) -> dict:
    from meliad_core.recipes import apply_override, resolve_recipe_mapping

    mapping = resolve_recipe_mapping(BUNDLED[model]) if source == "bundled" else inline_mapping(model, args)
    steps = args.steps
    for text in [f"train.steps={steps}", f"train.warmup={max(1, steps // 10)}", f"train.checkpoint_every={steps}",
                 f"train.log_every={max(1, steps // 5)}", f"eval.every={steps}", "eval.steps=0", *args.sets]:
        mapping = apply_override(mapping, text)
    return mapping


def one(model: str, args: argparse.Namespace) -> dict:
    import keras

    from meliad_core.config import validate_recipe
    from meliad_core.report import long_range_report
    from meliad_core.runner import run_training

    recipe = validate_recipe(recipe_mapping(model, args, args.recipes))
    workdir = os.path.join(args.workdir, model)
    start = time.perf_counter()
    summary = run_training(recipe, workdir, out=sys.stderr)
    train_seconds = time.perf_counter() - start
    report = long_range_report(workdir, batches=args.eval_batches, out=sys.stderr)
    train = summary.get("train") or {}
    return {"model": model, "recipe": recipe.name, "backend": keras.backend.backend(), "steps": summary["step"],
            "train_seconds": train_seconds, "tokens_per_s": train.get("tokens_per_second"),
            "batch": f"{recipe.data.batch_size}x{recipe.data.segment_length}",
            "overall": report["overall"], "long_range": report["long_range"], "rest": report["rest"],
            "first_segment": report["first_segment"], "later_segments": report["later_segments"],
            "report": os.path.join(workdir, "report")}


def _bits(category: dict) -> str:
    value = category["bits_per_token"]
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("jax", "torch", "tensorflow"),
                        default=os.environ.get("KERAS_BACKEND", "jax"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=500, help="training steps per model (default 500)")
    parser.add_argument("--eval-batches", type=int, default=32, help="eval batches the report streams (default 32)")
    parser.add_argument("--recipes", choices=("auto", "bundled", "inline"), default="auto",
                        help="bundled tiny recipes if all exist (auto), or the inline ones of this script")
    parser.add_argument("--segment-length", type=int, default=128, help="inline recipes: data.segment_length")
    parser.add_argument("--window", type=int, default=64, help="inline recipes: attention.window of xl and recurrent")
    parser.add_argument("--batch-size", type=int, default=4, help="inline recipes: data.batch_size")
    parser.add_argument("--memory-size", type=int, default=2048, help="inline recipes: memory.size")
    parser.add_argument("--neighbors", type=int, default=32, help="inline recipes: memory.neighbors")
    parser.add_argument("--states", type=int, default=64, help="inline recipes: recurrence.num_states")
    parser.add_argument("--workdir", default=None,
                        help="keep the runs in WORKDIR/<model> (default: a temporary folder)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for every model (repeatable)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.eval_batches < 1:
        parser.error("--steps and --eval-batches must be positive")
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    from _common import machine, print_table

    if args.recipes == "auto":
        args.recipes = "bundled" if bundled_available() else "inline"
    print(f"command: python benchmarks/long_range.py {' '.join(sys.argv[1:])}")
    print(f"machine: {machine()}")
    print(f"recipes: {args.recipes}" + (f" ({', '.join(BUNDLED[m] for m in args.models)})"
                                        if args.recipes == "bundled" else " (defined in benchmarks/long_range.py)"))
    workdir = args.workdir or tempfile.mkdtemp(prefix="meliad_long_range_")
    env = {**os.environ, "KERAS_BACKEND": args.backend}
    shared = ["--steps", str(args.steps), "--eval-batches", str(args.eval_batches), "--recipes", args.recipes,
              "--segment-length", str(args.segment_length), "--window", str(args.window), "--batch-size",
              str(args.batch_size), "--memory-size", str(args.memory_size), "--neighbors", str(args.neighbors),
              "--states", str(args.states), "--workdir", workdir]
    for text in args.sets:
        shared += ["--set", text]
    rows = []
    try:
        for model in args.models:
            proc = subprocess.run([sys.executable, __file__, "--one", model, *shared], env=env, capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                rows.append([model, "-", args.backend, "-", "-", "-", "-", "-", "-", "-", f"failed: {tail[:80]}"])
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            tps = r["tokens_per_s"]
            rows.append([model, r["recipe"], r["backend"], r["batch"], str(r["steps"]), f"{r['train_seconds']:.0f}",
                         f"{tps:,.0f}" if tps else "-", f"{r['overall']['tokens']:,}", _bits(r["overall"]),
                         f"{_bits(r['long_range'])} ({r['long_range']['tokens']:,})", _bits(r["rest"])])
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(["model", "recipe", "backend", "batch", "steps", "train s", "tokens/s", "eval tokens",
                 "bits/tok", "long-range bits/tok (tokens)", "rest bits/tok"], rows)
    print(f"eval: {args.eval_batches} batches of a fresh eval stream per model; long-range = recalled facts "
          "(at least 512 characters after their mention); tokens/s = training throughput"
          + (f"; reports in {workdir}/<model>/report" if args.workdir else ""))


if __name__ == "__main__":
    main()
