"""`meliad run`: trains a recipe, evaluates on its own stream, logs metrics, checkpoints, resumes.

Layout of a run's workdir:

    recipe.yaml        the resolved recipe this run uses
    metrics.jsonl      one JSON object per logged point (train and eval)
    checkpoints/       step_<N>/ folders (see meliad_core.checkpoint)

A workdir that already holds a checkpoint is resumed from its newest intact one, continuing exactly
as if the run had never stopped: weights, optimizer, every stream's state, data positions and step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from meliad_core.config import Recipe, RecipeError

LOG2E = 1.0 / math.log(2.0)
RUN_STREAMS = ("train", "eval")  # the streams a run's model (and so its checkpoints) keeps


class RunError(RuntimeError):
    """A run that cannot start or continue; the message is one line for the user."""


class MetricsLog:
    """Appends JSON lines to WORKDIR/metrics.jsonl (and TensorBoard events when tensorboard is
    installed); on resume, drops the lines after the checkpoint."""

    def __init__(self, path: Path, resume_step: int | None):
        from meliad_core.tensorboard_log import TensorBoardLog

        self.path = path
        self.tensorboard = TensorBoardLog(path.parent)
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.tensorboard.write(record)

    def close(self) -> None:
        self.tensorboard.close()


class Accumulator:
    """Token-weighted running sums between two log lines."""

    def __init__(self):
        self.nats = self.tokens = self.correct = self.chars = 0.0
        self.steps = 0
        self.seconds = 0.0
        self.processed = 0

    def add(self, logs: dict, batch: dict, seconds: float = 0.0) -> None:
        count = float(logs["scored_tokens"])  # the model's own count of the tokens its loss scores
        self.nats += float(logs["nats_per_token"]) * count
        self.correct += float(logs["accuracy"]) * count
        self.tokens += count
        self.chars += float(np.sum(batch["num_chars"]))
        self.steps += 1
        self.seconds += seconds
        self.processed += batch["tokens"].size

    def summary(self) -> dict:
        nats = self.nats / max(self.tokens, 1e-6)
        return {
            "nats_per_token": nats,
            "bits_per_token": nats * LOG2E,
            "bits_per_char": self.nats * LOG2E / max(self.chars, 1e-6),
            "accuracy": self.correct / max(self.tokens, 1e-6),
            "tokens_per_second": self.processed / self.seconds if self.seconds > 0 else None,
            "scored_tokens": int(self.tokens),
        }


def _first_difference(saved, current, prefix: str = "") -> str | None:
    """The first dotted key whose value differs between two recipe mappings, as 'key: old -> new'."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in list(saved) + [k for k in current if k not in saved]:
            found = _first_difference(saved.get(key), current.get(key), f"{prefix}.{key}" if prefix else key)
            if found:
                return found
        return None
    return None if saved == current else f"{prefix}: {saved!r} -> {current!r}"


def _progress(step: int, total: int, record: dict, out) -> None:
    width = 24
    done = int(width * step / max(total, 1))
    tps = record.get("tokens_per_second")
    rate = f"{tps:,.0f} tok/s" if tps else "-"
    print(f"[{'#' * done}{'.' * (width - done)}] step {step}/{total}  loss {record['nats_per_token']:.4f} nats/tok  "
          f"{record['bits_per_token']:.4f} bits/tok  acc {record['accuracy']:.3f}  lr {record['learning_rate']:.2e}  "
          f"{rate}", file=out, flush=True)


def run_training(recipe: Recipe, workdir: Path, load_dir: Path | None = None, out=None) -> dict:
    """Trains `recipe` in `workdir` (resuming if it holds a checkpoint). Returns the final summary."""
    import keras

    from meliad_core import checkpoint as ckpt
    from meliad_core.data import keras_inputs, stream
    from meliad_core.model import build_model
    from meliad_core.optimizers import make_optimizer
    from meliad_core.vocab import load_vocabulary

    out = out or sys.stdout
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train_cfg = recipe.train
    vocabulary = load_vocabulary(recipe.data)
    vocab_size = recipe.model.vocab_size or vocabulary.vocab_size
    if vocab_size < vocabulary.vocab_size:
        raise RecipeError(f"model.vocab_size: got {vocab_size}, expected at least the vocabulary's "
                          f"{vocabulary.vocab_size}")

    model = build_model(recipe, vocab_size=vocab_size, streams=RUN_STREAMS)  # no predict stream: less memory
    optimizer = make_optimizer(train_cfg, train_cfg.steps)
    model.compile(optimizer=optimizer)
    optimizer.build(model.trainable_variables)
    train_stream = stream(recipe, split="train")
    eval_stream = stream(recipe, split="eval")

    resumed = ckpt.latest_valid_checkpoint(workdir, warn=lambda m: print(f"meliad: warning: {m}", file=out))
    step = 0
    if resumed is not None:
        path, manifest, arrays = resumed
        difference = _first_difference(manifest.get("recipe", {}), recipe.to_dict())
        if difference:
            raise RunError(f"{workdir} holds a run of a different recipe ({difference}); use a new --workdir, "
                           "or the same recipe to resume")
        try:
            ckpt.restore(model, optimizer, manifest, arrays)
        except ckpt.CheckpointError as exc:
            raise RunError(str(exc)) from None
        train_stream.set_state(manifest["data"]["train"])
        eval_stream.set_state(manifest["data"]["eval"])
        step = int(manifest["step"])
        print(f"resuming from {path} (step {step})", file=out, flush=True)
    elif load_dir is not None:
        loaded = ckpt.latest_valid_checkpoint(Path(load_dir), warn=lambda m: print(f"meliad: warning: {m}", file=out))
        if loaded is None:
            raise RunError(f"--load-dir {load_dir}: no intact checkpoint found there")
        try:
            ckpt.restore(model, optimizer, loaded[1], loaded[2], weights_only=True)
        except ckpt.CheckpointError as exc:
            raise RunError(str(exc)) from None
        print(f"starting from the weights of {loaded[0]}", file=out, flush=True)

    (workdir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    log = MetricsLog(workdir / "metrics.jsonl", resume_step=step if resumed else None)
    schedule = optimizer.learning_rate if hasattr(optimizer.learning_rate, "value_at") else None

    def learning_rate(at: int) -> float:
        return float(schedule.value_at(at)) if schedule is not None else float(optimizer.learning_rate)

    def save(at: int) -> None:
        ckpt.save_checkpoint(workdir, at, model, optimizer, keep=train_cfg.keep_checkpoints, extra={
            "recipe": recipe.to_dict(), "backend": keras.backend.backend(),
            "data": {"train": train_stream.get_state(), "eval": eval_stream.get_state()}})

    def evaluate(at: int) -> dict:
        acc = Accumulator()
        for _ in range(recipe.eval.steps):
            batch = next(eval_stream)
            start = time.perf_counter()
            logs = model.test_on_batch(keras_inputs(batch), return_dict=True)
            acc.add(logs, batch, time.perf_counter() - start)
        record = {"step": at, "split": "eval", **acc.summary(), "learning_rate": learning_rate(at)}
        log.write(record)
        print(f"  eval at step {at}: {record['bits_per_token']:.4f} bits/tok, {record['bits_per_char']:.4f} "
              f"bits/char, acc {record['accuracy']:.3f}", file=out, flush=True)
        return record

    print(f"training {recipe.name or 'recipe'} on {keras.backend.backend()}: {train_cfg.steps} steps, "
          f"batch {recipe.data.batch_size} x {recipe.data.segment_length} tokens, "
          f"{model.count_params() - sum(int(np.prod(v.shape)) for v in model.non_trainable_variables):,} "
          f"parameters", file=out, flush=True)
    acc, total = Accumulator(), Accumulator()
    last_eval = last_train = None
    first_step_of_run = True
    while step < train_cfg.steps:
        batch = next(train_stream)
        start = time.perf_counter()
        logs = model.train_on_batch(keras_inputs(batch), return_dict=True)
        seconds = time.perf_counter() - start
        if not math.isfinite(float(logs["loss"])):
            raise RunError(f"the loss became {float(logs['loss'])} at step {step + 1}; the last checkpoint is kept")
        step += 1
        # the first step of a process compiles: it is left out of the throughput
        acc.add(logs, batch, 0.0 if first_step_of_run else seconds)
        total.add(logs, batch, 0.0 if first_step_of_run else seconds)
        if first_step_of_run:
            acc.processed = total.processed = 0
        first_step_of_run = False
        if step % train_cfg.log_every == 0 or step == train_cfg.steps:
            record = {"step": step, "split": "train", **acc.summary(), "learning_rate": learning_rate(step)}
            log.write(record)
            _progress(step, train_cfg.steps, record, out)
            last_train = record
            acc = Accumulator()
        if step % recipe.eval.every == 0 or (step == train_cfg.steps and recipe.eval.steps > 0):
            if recipe.eval.steps > 0:
                last_eval = evaluate(step)
        if step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps:
            save(step)
    log.close()
    if step == 0 or (resumed and step == int(resumed[1]["step"]) and step >= train_cfg.steps):
        print(f"nothing to do: the run is already at step {step} of {train_cfg.steps}", file=out, flush=True)
    summary = {"step": step, "train": last_train, "eval": last_eval,
               "tokens_per_second": total.summary()["tokens_per_second"] if total.steps else None}
    parts = [f"done: {step} steps"]
    if last_train:
        parts.append(f"train {last_train['bits_per_token']:.4f} bits/tok (last {train_cfg.log_every} steps)")
    if last_eval:
        parts.append(f"eval {last_eval['bits_per_token']:.4f} bits/tok ({last_eval['bits_per_char']:.4f} bits/char)")
    if total.steps and total.summary()["tokens_per_second"]:
        parts.append(f"{total.summary()['tokens_per_second']:,.0f} tokens/s")
    parts.append(f"workdir {workdir}")
    print(" | ".join(parts), file=out, flush=True)
    if recipe.eval.report_batches > 0:
        from meliad_core.report import long_range_report

        summary["report"] = long_range_report(workdir, batches=recipe.eval.report_batches, out=out)
    return summary
