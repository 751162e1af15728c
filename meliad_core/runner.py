"""`meliad run`: trains a recipe, evaluates on its own stream, logs metrics, checkpoints, resumes.

Layout of a run's workdir:

    recipe.yaml        the resolved recipe this run uses
    metrics.jsonl      one JSON object per logged point (train and eval)
    checkpoints/       step_<N>/ folders (see meliad_core.checkpoint)
    .lock              held while a run uses the workdir (see WorkdirLock)
    tensorboard/       event files, when tensorboard is installed
    report/            the long-range report, when eval.report_batches > 0

A workdir that already holds a checkpoint is resumed from its newest intact one, continuing exactly
as if the run had never stopped: weights, optimizer, every stream's state, data positions, step, and
the running sums of the train metrics since the last logged row (so a run resumed between two log
rows logs the same numbers as one that never stopped). `metrics.jsonl` is crash-consistent: every row
is one appended line, and a resumed run drops the rows after its checkpoint, including a last row that
a kill cut short (with a notice), before it appends again.

Extending a run: the same recipe with a larger `train.steps` (`--set train.steps=N`, or `--extend K`
for K more steps) continues a finished or stopped run. Decision: the learning-rate schedule keeps the
length it was started with (its T is the first run's `train.steps`, unless `learning_rate.max_steps`
sets it), so the learning rate goes on smoothly along meliad's own formula for steps past T (cosine
and linear halve every further T) rather than jumping back up. Only `CAN_CHANGE` keys may differ from
the run's recipe; anything else is refused with one line naming the first difference.

Nothing is lost: a run never truncates or overwrites results it did not write. A workdir whose
checkpoints are all damaged, or that holds another recipe's files, stops the run with one line;
`--restart` moves the old files into `previous_<time>/` and starts again from step 0. Faults (full
disk, read-only or blocked folders, out of memory, unreadable data) stop with one line (`RunFault`,
exit status 1); the newest intact checkpoint is always kept and the next run resumes from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import sys
import time
import typing
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from meliad_core.config import Recipe, RecipeError, migrate_stored_recipe, validate_recipe
from meliad_core.units import LOG2E, one_line

try:  # the workdir lock is the kernel's; without fcntl (Windows) only the pid in the file is checked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

RUN_STREAMS = ("train", "eval")  # the streams a run's model (and so its checkpoints) keeps
RECIPE_NAME, METRICS_NAME, LOCK_NAME = "recipe.yaml", "metrics.jsonl", ".lock"
# keys that may differ from the recipe a workdir's run was started with: they do not change what is computed
CAN_CHANGE = ("name", "description", "train.steps", "train.keep_checkpoints", "eval.report_batches",
              "train.compile",  # compiling changes speed, not what is computed
              "distribution", "distribution.kind", "distribution.devices",  # a run may resume on other devices
              "distribution.model_axis")


class RunError(RuntimeError):
    """A run that cannot start or continue as asked; the message is one line for the user (exit 2)."""

    exit_code = 2


class RunFault(RunError):
    """The machine or the workdir failed the run (disk, memory, a damaged or busy workdir), exit 1.
    The newest intact checkpoint is kept; the next run resumes from it."""

    exit_code = 1


def _notice(message: str) -> None:
    print(f"meliad: notice: {message}", file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    print(f"meliad: warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# The workdir lock


class WorkdirLock:
    """An exclusive lock on a workdir for a run's whole life: `WORKDIR/.lock` holds the holder's pid.

    The lock itself is the kernel's (flock), released whenever the holder exits, even by kill -9; a
    lock file that nobody holds is stale and is taken over with a notice. A second run on a workdir
    in use stops with a `RunFault` naming the holder's pid.
    """

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        self.workdir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                holder = self._lock(fd)
                if holder is not None:
                    raise RunFault(f"{self.workdir} is in use by another meliad run (pid {holder or 'unknown'}); "
                                   "wait for it to finish, or use another --workdir")
                try:  # a holder that just finished unlinks the file it locked: lock the one there now
                    current = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    current = False
            except BaseException:
                os.close(fd)
                raise
            if current:
                break
            os.close(fd)
        previous = _read_pid(fd)
        if previous and previous != os.getpid():
            _notice(f"taking over the stale lock of {self.workdir} from pid {previous}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def _lock(self, fd: int) -> int | str | None:
        """None when locked; otherwise the holder's pid ('' when unknown)."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return None
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                return _read_pid(fd) or ""
        holder = _read_pid(fd)  # pragma: no cover
        return holder if holder and holder != os.getpid() and _alive(holder) else None

    def __exit__(self, *exc_info) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:  # pragma: no cover (used without fcntl only)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------
# Metrics


class MetricsLog:
    """WORKDIR/metrics.jsonl, written so that a kill at any byte leaves a file the next run can read.

    Each row is one JSON line, appended with one write. On opening, the rows after `start_step` (those
    a killed run logged after its last checkpoint) are dropped, and so is a last line without its
    newline (a row cut short by a kill or a full disk), with a notice; the file is then rewritten
    atomically. A damaged row anywhere else was not written by an interrupted append: the run stops
    with one line rather than drop it. TensorBoard events are written alongside when installed.
    """

    def __init__(self, path: Path, start_step: int = 0):
        from meliad_core.tensorboard_log import TensorBoardLog

        self.path = Path(path)
        self.rows = read_metrics(self.path, start_step)
        self.tensorboard = TensorBoardLog(self.path.parent, resume_step=start_step)
        self._file = open(self.path, "ab")

    def write(self, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode("utf-8")
        offset = self._file.tell()
        try:
            self._file.write(data)
            self._file.flush()
        except OSError:
            try:  # leave no half row behind (a full disk may take part of it)
                self._file.truncate(offset)
            except OSError:
                pass
            raise
        self.rows.append(record)
        self.tensorboard.write(record)

    def sync(self) -> None:
        """Makes the rows durable (before a checkpoint says the run may resume after them)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self.tensorboard.flush()

    def close(self) -> None:
        self._file.close()
        self.tensorboard.close()


def read_metrics(path: Path, start_step: int | None = None) -> list[dict]:
    """The rows of a metrics.jsonl. With `start_step`, the file is also repaired for a run that resumes
    after that step: later rows and a cut-short last line are dropped (atomically, with a notice)."""
    if not path.exists():
        return []
    if not path.is_file():
        raise RunFault(f"{path} is not a file (meliad writes its metrics there); move it away")
    data = path.read_bytes()
    lines = data.split(b"\n")
    partial = lines.pop()  # after the last newline: b"" unless a write was cut short
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
                raise ValueError("not a row with a step")
        except ValueError:
            raise RunFault(f"{path}:{number}: a damaged row that no interrupted write of meliad leaves "
                           "(only the last line can be cut short); repair or remove that line") from None
        rows.append(row)
    if start_step is None:
        return rows
    kept = [row for row in rows if row["step"] <= start_step]
    if partial:
        _notice(f"{path}: dropped a last row cut short by an interrupted write ({len(partial)} bytes)")
    if partial or len(kept) != len(rows):
        _atomic_write(path, "".join(json.dumps(row) + "\n" for row in kept).encode("utf-8"))
    return kept


class Accumulator:
    """Token-weighted running sums between two log lines; `state()` goes into checkpoints, so that a
    resumed run logs exactly the rows an uninterrupted one does."""

    FIELDS = ("nats", "tokens", "correct", "chars", "steps", "seconds", "processed")

    def __init__(self, state: dict | None = None):
        self.nats = self.tokens = self.correct = self.chars = 0.0
        self.steps = 0
        self.seconds = 0.0
        self.processed = 0
        for key, value in (state or {}).items():
            if key in self.FIELDS:
                setattr(self, key, value)

    def add(self, logs: dict, batch: dict, seconds: float | None = None) -> None:
        """Adds one step; `seconds` None: an untimed step (one that compiled), left out of the throughput."""
        count = float(logs["scored_tokens"])  # the model's own count of the tokens its loss scores
        self.nats += float(logs["nats_per_token"]) * count
        self.correct += float(logs["accuracy"]) * count
        self.tokens += count
        self.chars += float(np.sum(batch["num_chars"]))
        self.steps += 1
        if seconds is not None:
            self.seconds += seconds
            self.processed += int(batch["tokens"].size)

    def state(self) -> dict:
        return {key: getattr(self, key) for key in self.FIELDS}

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


# ----------------------------------------------------------------------------------------------
# Comparing a run's recipe with the one asked for


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def recipe_defaults() -> dict:
    """Every recipe key with its default, the optional sections (memory, recurrence) included."""
    tree = Recipe().to_dict()
    for name, hint in typing.get_type_hints(Recipe).items():
        for cls in typing.get_args(hint) or (hint,):
            if dataclasses.is_dataclass(cls) and tree.get(name) is None:
                tree[name] = _plain(dataclasses.asdict(cls()))
    return tree


def _differences(saved: Any, current: Any, defaults: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for each difference between two recipe mappings. A key
    the saved recipe lacks (written before the key existed) counts only if the current value is not
    its default."""
    if isinstance(saved, dict) and isinstance(current, dict):
        defaults = defaults if isinstance(defaults, dict) else {}
        found = []
        for key in list(saved) + [k for k in current if k not in saved]:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved and key in defaults and current[key] == defaults[key]:
                continue
            found += _differences(saved.get(key), current.get(key), defaults.get(key), dotted)
        return found
    if isinstance(current, dict) and saved is None and current == defaults:
        return []
    return [] if saved == current else [(prefix, saved, current)]


def _first_difference(saved: dict, current: dict, allowed: tuple[str, ...] = ()) -> str | None:
    """The first difference outside `allowed`, as 'key: old -> new', or None."""
    for key, old, new in _differences(saved, current, recipe_defaults()):
        if key not in allowed:
            return f"{key}: {old!r} -> {new!r}"
    return None


# ----------------------------------------------------------------------------------------------
# Faults


_OOM = re.compile(r"RESOURCE_EXHAUSTED|out of memory|OOM when allocating|Unable to allocate|ResourceExhausted", re.I)
_SIZE = r"(\d+(?:\.\d+)?)\s*(bytes|[KMGTPE]i?B|B)\b"


def _bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} bytes" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} PiB"  # pragma: no cover


def out_of_memory_message(exc: BaseException, where: str = "") -> str | None:
    """One line for an out-of-memory error of any backend (or numpy), naming the size that did not fit
    (and `where`, e.g. " at step 12"); None if `exc` is not one."""
    text = one_line(exc)
    if not isinstance(exc, MemoryError) and not _OOM.search(text):
        return None
    size = None
    match = re.search(r"allocat\w*\s+(?:tensor\s+)?" + _SIZE, text, re.I) or re.search(_SIZE, text)
    if match:
        number, unit = match.groups()
        size = _bytes(float(number)) if unit in ("bytes", "B") else f"{number} {unit}"
    elif match := re.search(r"shape\s*\[([\d,\s]+)\]", text):
        size = f"a tensor of shape [{match.group(1).strip()}]"
    what = f"{size} did not fit" if size else "an allocation did not fit"
    return (f"out of memory: {what}{where}; try a smaller data.batch_size, data.segment_length or memory.size "
            "(or a smaller model)")


_HINTS = {  # what to do about an OSError, by errno
    errno.ENOSPC: "free some space, or use another --workdir",
    errno.EDQUOT: "free some space, or use another --workdir",
    errno.EROFS: "use a --workdir on a writable file system",
    errno.EACCES: "make the folder writable, or use another --workdir",
    errno.EPERM: "make the folder writable, or use another --workdir",
    errno.ENOTDIR: "a file stands where meliad needs a folder: move it away",
    errno.EISDIR: "a folder stands where meliad writes a file: move it away",
    errno.EEXIST: "a file stands where meliad needs a folder: move it away",
    errno.EIO: "the device or file system reported a read or write error",
}


def describe_os_error(exc: OSError) -> str:
    """`PATH: what happened (what to do)` for an OSError, on one line."""
    what = exc.strerror or one_line(exc)
    path = f"{exc.filename}: " if exc.filename else ""
    hint = _HINTS.get(exc.errno)
    return f"{path}{what}" + (f" ({hint})" if hint else "")


# ----------------------------------------------------------------------------------------------
# Files of the workdir


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_workdir_path(workdir: Path | str) -> Path:
    """The workdir as a Path, or RunError for one that cannot be a run folder."""
    if not str(workdir).strip():
        raise RunError("--workdir: got '', expected a folder for the run's files")
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise RunError(f"--workdir {workdir}: is a file, expected a folder for the run's files")
    return workdir


def _check_files(workdir: Path) -> None:
    """Stops early, before a model is built, if something stands where the run writes."""
    from meliad_core.checkpoint import CHECKPOINT_DIR

    for name in (RECIPE_NAME, METRICS_NAME):
        path = workdir / name
        if path.exists() and not path.is_file():
            raise RunFault(f"{path} is a folder, expected the file meliad writes there; move it away")
    folder = workdir / CHECKPOINT_DIR
    if folder.exists() and not folder.is_dir():
        raise RunFault(f"{folder} is a file, expected the folder of the run's checkpoints; move it away")
    for path in (folder if folder.exists() else workdir, workdir):
        if not os.access(path, os.W_OK):
            raise RunFault(f"{path}: not writable (permission denied); make it writable or use another --workdir")


def _set_aside(workdir: Path) -> None:
    """For --restart: moves the files of the previous run into WORKDIR/previous_<time>/."""
    from meliad_core.checkpoint import CHECKPOINT_DIR

    names = [n for n in (CHECKPOINT_DIR, METRICS_NAME, RECIPE_NAME, "tensorboard", "report") if (workdir / n).exists()]
    if not names:
        return
    target = workdir / time.strftime("previous_%Y%m%d-%H%M%S")
    while target.exists():
        target = target.with_name(target.name + "_")
    target.mkdir()
    for name in names:
        os.replace(workdir / name, target / name)
    _notice(f"--restart: moved the previous run's {', '.join(names)} to {target}")


def _check_manifest(path: Path, manifest: dict) -> None:
    from meliad_core.checkpoint import CheckpointError

    if not isinstance(manifest.get("recipe"), dict):
        raise CheckpointError(f"{path}: the manifest has no 'recipe' key")
    data = manifest.get("data")
    if not isinstance(data, dict) or not all(isinstance(data.get(s), dict) for s in RUN_STREAMS):
        raise CheckpointError(f"{path}: the manifest has no 'data' key with the train and eval positions")


def _check_fresh(workdir: Path, recipe: Recipe) -> None:
    """A workdir without checkpoints: new, or the same recipe's run killed before its first checkpoint."""
    saved_path, metrics = workdir / RECIPE_NAME, workdir / METRICS_NAME
    if saved_path.is_file():
        try:
            saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError, ValueError):
            saved = None
        difference = _first_difference(saved, recipe.to_dict(), CAN_CHANGE) if isinstance(saved, dict) else \
            f"{RECIPE_NAME}: unreadable"
        if difference:
            raise RunError(f"{workdir} holds the files of another recipe's run, without a checkpoint ({difference}); "
                           "use a new --workdir, or --restart to move them aside and start again")
    elif metrics.is_file() and metrics.stat().st_size > 0:
        raise RunError(f"{workdir} holds a {METRICS_NAME} but no {RECIPE_NAME} or checkpoint; use a new --workdir, "
                       "or --restart to move it aside and start again")


# ----------------------------------------------------------------------------------------------
# Before a model is built


@dataclasses.dataclass
class PreparedData:
    vocabulary: Any
    vocab_size: int
    train: Any  # BatchStream
    eval: Any


def prepare_data(recipe: Recipe, rows: slice | None = None) -> PreparedData:
    """Everything `meliad run` checks about the data before it builds a model (`meliad recipe show`
    checks the same): the source's and vocabulary's options and files (the first batch of each split
    is read), and model.vocab_size against the vocabulary. Raises RecipeError, DataError or OSError
    with one-line messages; touches no workdir. `rows`: the batch slots this process reads (a host of
    a multi-host run with data.assignment round_robin); None: all."""
    from meliad_core.data import stream
    from meliad_core.vocab import load_vocabulary

    vocabulary = load_vocabulary(recipe.data)
    vocab_size = recipe.model.vocab_size or vocabulary.vocab_size
    if vocab_size < vocabulary.vocab_size:
        raise RecipeError(f"model.vocab_size: got {vocab_size}, expected at least the vocabulary's "
                          f"{vocabulary.vocab_size} (data.vocabulary {recipe.data.vocabulary!r})")
    if recipe.model.vocab_size is None:  # the sizes' bounds again, with the vocabulary's size
        mapping = recipe.to_dict()
        mapping["model"]["vocab_size"] = vocab_size
        validate_recipe(mapping)
    streams = []
    for split in RUN_STREAMS:
        batches = stream(recipe, split=split)
        if rows is not None:
            batches.read_rows(rows)
        start = batches.get_state()
        read_batch(batches, recipe)  # the first batch is read now, so unreadable or empty data stops here
        batches.set_state(start)
        streams.append(batches)
    return PreparedData(vocabulary, vocab_size, *streams)


def read_batch(batches, recipe: Recipe) -> dict:
    """The next batch; a data file that cannot be read is a one-line RunFault naming the source."""
    try:
        return next(batches)
    except OSError as exc:
        raise RunFault(f"cannot read the {batches.split} data of data.source {recipe.data.source!r}: "
                       f"{describe_os_error(exc)}") from exc


# ----------------------------------------------------------------------------------------------
# The run


def _progress(step: int, total: int, record: dict, out) -> None:
    width = 24
    done = int(width * min(step, total) / max(total, 1))
    tps = record.get("tokens_per_second")
    rate = f"{tps:,.0f} tok/s" if tps else "-"
    print(f"[{'#' * done}{'.' * (width - done)}] step {step}/{total}  loss {record['nats_per_token']:.4f} nats/tok  "
          f"{record['bits_per_token']:.4f} bits/tok  acc {record['accuracy']:.3f}  lr {record['learning_rate']:.2e}  "
          f"{rate}", file=out, flush=True)


def run_training(recipe: Recipe, workdir: Path, load_dir: Path | None = None, out=None, *,
                 extend: int = 0, restart: bool = False) -> dict:
    """Trains `recipe` in `workdir` (resuming if it holds a checkpoint). Returns the final summary.

    `extend`: continue the workdir's run for this many steps more than its own `train.steps`.
    `restart`: move the workdir's previous files aside (`previous_<time>/`) and start from step 0.
    Raises RecipeError/RunError (bad input, exit 2) or RunFault (exit 1), each with one line.
    """
    from meliad_core.threads import configure_threads

    out = out or sys.stdout
    configure_threads()  # for Python callers; the CLI has already done it before the framework started
    workdir = check_workdir_path(workdir)
    if extend < 0:
        raise RunError(f"--extend: got {extend}, expected a positive number of steps")
    progress = {"where": "", "kept": None}
    try:
        from meliad_core.distribution import data_rows, is_chief, make_distribution

        distribution = make_distribution(recipe.distribution, recipe.data.batch_size)
        data = prepare_data(recipe, data_rows(distribution, recipe.data))
        if not is_chief(distribution):  # a multi-host run: process 0 alone writes to the (shared) workdir
            with open(os.devnull, "w") as quiet:
                return _run(recipe, workdir, data, load_dir, quiet, extend, restart, progress, distribution)
        created = not workdir.exists()
        try:
            with WorkdirLock(workdir):
                return _run(recipe, workdir, data, load_dir, out, extend, restart, progress, distribution)
        finally:
            if created and workdir.is_dir() and not any(workdir.iterdir()):
                workdir.rmdir()  # a run that stopped before writing anything leaves nothing behind
    except RunError:
        raise
    except OSError as exc:
        raise RunFault(_fault(describe_os_error(exc) + progress["where"], progress)) from exc  # --debug shows both
    except Exception as exc:
        message = out_of_memory_message(exc, progress["where"])
        if message is None:
            raise
        raise RunFault(_fault(message, progress)) from exc


def _placed(distribution):
    """The distribution's scope (variables placed and sharded as they are created), or nothing."""
    return distribution.scope() if distribution is not None else contextlib.nullcontext()


def _fault(message: str, progress: dict) -> str:
    kept = progress["kept"]
    after = f"; the newest intact checkpoint ({kept}) is kept and the next run resumes from it" if kept else ""
    return f"{message}{after}"


def _run(recipe: Recipe, workdir: Path, data: PreparedData, load_dir, out, extend: int, restart: bool,
         progress: dict, distribution=None) -> dict:
    """The run in one process. In a multi-host run every process runs this (the steps and the
    checkpoint's gathering are collectives); only process 0 (the chief) writes to the workdir, and the
    others read the same checkpoints from it (a shared file system)."""
    from meliad_core import checkpoint as ckpt
    from meliad_core.distribution import check_agreement, describe, is_chief
    from meliad_core.model import build_model
    from meliad_core.optimizers import make_optimizer

    chief = is_chief(distribution)
    if chief:
        removed = ckpt.remove_temporaries(workdir)
        if removed:
            _notice(f"removed {removed} unfinished checkpoint folder(s) left in {workdir / ckpt.CHECKPOINT_DIR}")
        _check_files(workdir)
        if restart:
            _set_aside(workdir)
            _check_files(workdir)
    resumed = None if restart and not chief else \
        ckpt.latest_valid_checkpoint(workdir, warn=_warn if chief else lambda _: None, check=_check_manifest)
    # with --restart the chief has set every checkpoint aside; the other hosts must not list them meanwhile
    damaged = ckpt.list_checkpoints(workdir) if resumed is None and not restart else []
    if damaged:
        raise RunFault(f"{workdir}: none of its {len(damaged)} checkpoint(s) is intact (see the warnings), so "
                       "nothing was changed; --restart moves the run's files aside and starts again from step 0")
    step, schedule_steps, accumulator = 0, recipe.train.steps, None
    if resumed is not None:
        path, manifest, arrays = resumed
        saved, step = migrate_stored_recipe(manifest["recipe"]), int(manifest["step"])
        progress["kept"] = path.name
        if extend:
            steps = int(saved.get("train", {}).get("steps", 0)) + extend
            recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, steps=steps))
            validate_recipe(recipe.to_dict())
        difference = _first_difference(saved, recipe.to_dict(), CAN_CHANGE)
        if difference:
            raise RunError(f"{workdir} holds a run of a different recipe ({difference}); use a new --workdir, "
                           "or the same recipe to resume (only " + ", ".join(CAN_CHANGE) + " may change)")
        schedule_steps = int(manifest.get("schedule_steps") or saved.get("train", {}).get("steps") or step or 1)
        accumulator = manifest.get("accumulator")
        if step >= recipe.train.steps:
            return _nothing_to_do(recipe, workdir, step, out)
        saved_steps = saved.get("train", {}).get("steps")
        if saved_steps != recipe.train.steps:
            how = "extending" if recipe.train.steps > (saved_steps or 0) else "shortening"
            print(f"{how} the run of {workdir} from {saved_steps} to {recipe.train.steps} steps; the learning-"
                  f"rate schedule keeps its length of {schedule_steps} steps", file=out, flush=True)
    else:
        if extend:
            raise RunError(f"--extend: {workdir} holds no checkpoint of a run to extend")
        if chief:
            _check_fresh(workdir, recipe)
    train_cfg = recipe.train
    check_agreement(distribution, [step, schedule_steps, train_cfg.steps], "the step to start from, the schedule's "
                    "length and train.steps")

    progress["where"] = " while building the model"
    with _placed(distribution):  # variables placed (the state sharded by row) as they are created
        model = build_model(recipe, vocab_size=data.vocab_size, streams=RUN_STREAMS)  # no predict stream
        optimizer = make_optimizer(train_cfg, schedule_steps)
        model.compile(optimizer=optimizer)
        optimizer.build(model.trainable_variables)
    if distribution is not None:
        print(describe(distribution), file=out, flush=True)
    if resumed is not None:
        try:
            ckpt.restore(model, optimizer, manifest, arrays)
        except ckpt.CheckpointError as exc:
            raise RunError(str(exc)) from None
        del arrays
        data.train.set_state(manifest["data"]["train"])
        data.eval.set_state(manifest["data"]["eval"])
        print(f"resuming from {path} (step {step})", file=out, flush=True)
    elif load_dir is not None:
        loaded = ckpt.latest_valid_checkpoint(Path(load_dir), warn=_warn)
        if loaded is None:
            raise RunError(f"--load-dir {load_dir}: no intact checkpoint found there")
        try:
            ckpt.restore(model, optimizer, loaded[1], loaded[2], weights_only=True)
        except ckpt.CheckpointError as exc:
            raise RunError(str(exc)) from None
        print(f"starting from the weights of {loaded[0]}", file=out, flush=True)

    if chief:
        text = yaml.safe_dump(recipe.to_dict(), sort_keys=False).encode("utf-8")
        recipe_path = workdir / RECIPE_NAME
        if not recipe_path.is_file() or recipe_path.read_bytes() != text:
            _atomic_write(recipe_path, text)
    log = MetricsLog(workdir / METRICS_NAME, start_step=step) if chief else _NoLog()
    try:
        with _placed(distribution):
            return _loop(recipe, workdir, model, optimizer, data, log, step, schedule_steps, accumulator, out,
                         progress, distribution)
    finally:
        log.close()


class _NoLog:
    """The metrics log of a process other than the chief's in a multi-host run: it writes nothing."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def write(self, record: dict) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def _loop(recipe, workdir, model, optimizer, data, log, step, schedule_steps, accumulator, out, progress,
          distribution=None) -> dict:
    import keras

    from meliad_core import checkpoint as ckpt
    from meliad_core.data import keras_inputs
    from meliad_core.distribution import data_rows, gather_rows, is_chief, local_rows

    chief = is_chief(distribution)
    rows = local_rows(distribution, recipe.data.batch_size)  # the rows this process feeds
    own_rows = data_rows(distribution, recipe.data) is not None  # ... and the only ones it reads
    if chief and rows != slice(0, recipe.data.batch_size) and not own_rows:
        _notice("every host reads every batch slot's documents (data.assignment first_free); with "
                "data.assignment: round_robin each host reads only its own slots")

    def inputs(batch: dict) -> dict:
        return {key: value[rows] for key, value in keras_inputs(batch).items()}

    def next_batch(batches) -> dict:
        batch = read_batch(batches, recipe)
        if own_rows:  # the characters of every host's rows, for bits/char (a small collective)
            batch["num_chars"] = gather_rows(distribution, batch["num_chars"], rows)
        return batch

    def data_state(batches) -> dict:
        state = batches.get_state()
        if own_rows:  # every host's slots, so that the checkpoint resumes on any number of hosts
            slots = np.array([[-1] * 4 if slot is None else slot for slot in state["slots"]], np.int32)
            slots = gather_rows(distribution, slots, rows)
            state["slots"] = [None if slot[0] < 0 else [int(v) for v in slot] for slot in slots]
        return state

    train_cfg = recipe.train
    schedule = optimizer.learning_rate if hasattr(optimizer.learning_rate, "value_at") else None

    def learning_rate(at: int) -> float:
        return float(schedule.value_at(at)) if schedule is not None else float(optimizer.learning_rate)

    def save(at: int) -> None:
        log.sync()  # the rows up to this step are on disk before the checkpoint says "resume after them"
        arrays = ckpt.checkpoint_arrays(model, optimizer)  # every process: the sharded values are gathered
        positions = {"train": data_state(data.train), "eval": data_state(data.eval)}
        if not chief:
            return
        try:
            ckpt.save_checkpoint(workdir, at, model, optimizer, arrays=arrays, keep=train_cfg.keep_checkpoints, extra={
                "recipe": recipe.to_dict(), "backend": keras.backend.backend(),
                "data": positions,
                "schedule_steps": schedule_steps, "accumulator": acc.state()})
        except OSError as exc:
            kept = progress["kept"]
            keep = f"the newest intact checkpoint ({kept}) is kept and the next run resumes from it" if kept else \
                "no checkpoint was written yet; the next run starts again from step 0"
            raise RunFault(f"cannot write the checkpoint of step {at}: {describe_os_error(exc)}; {keep}") from exc
        progress["kept"] = f"step_{at}"

    def evaluate(at: int) -> dict:
        ev = Accumulator()
        for _ in range(recipe.eval.steps):
            batch = next_batch(data.eval)
            start = time.perf_counter()
            logs = model.test_on_batch(inputs(batch), return_dict=True)
            ev.add(logs, batch, time.perf_counter() - start)
        record = {"step": at, "split": "eval", **ev.summary(), "learning_rate": learning_rate(at)}
        write(record)
        print(f"  eval at step {at}: {record['bits_per_token']:.4f} bits/tok, {record['bits_per_char']:.4f} "
              f"bits/char, acc {record['accuracy']:.3f}", file=out, flush=True)
        return record

    def write(record: dict) -> None:
        try:
            log.write(record)
        except OSError as exc:
            raise RunFault(_fault(f"cannot append to {log.path}{progress['where']}: {describe_os_error(exc)}",
                                  progress)) from exc

    print(f"training {recipe.name or 'recipe'} on {keras.backend.backend()}: {train_cfg.steps} steps, "
          f"batch {recipe.data.batch_size} x {recipe.data.segment_length} tokens, "
          f"{model.count_params() - sum(int(np.prod(v.shape)) for v in model.non_trainable_variables):,} "
          f"parameters", file=out, flush=True)
    acc, total = Accumulator(accumulator), Accumulator()
    last_train = next((r for r in reversed(log.rows) if r.get("split") == "train"), None)
    last_eval = next((r for r in reversed(log.rows) if r.get("split") == "eval"), None)
    first_step_of_run = True
    while step < train_cfg.steps:
        progress["where"] = f" at step {step + 1}"
        batch = next_batch(data.train)
        start = time.perf_counter()
        logs = model.train_on_batch(inputs(batch), return_dict=True)
        seconds = time.perf_counter() - start
        if not math.isfinite(float(logs["loss"])):
            raise RunFault(f"the loss became {float(logs['loss'])} at step {step + 1}; the last checkpoint is kept")
        step += 1
        # the first step of a process compiles: it is left out of the throughput
        acc.add(logs, batch, None if first_step_of_run else seconds)
        total.add(logs, batch, None if first_step_of_run else seconds)
        first_step_of_run = False
        if step % train_cfg.log_every == 0 or step == train_cfg.steps:
            record = {"step": step, "split": "train", **acc.summary(), "learning_rate": learning_rate(step)}
            write(record)
            _progress(step, train_cfg.steps, record, out)
            last_train = record
            acc = Accumulator()
        if step % recipe.eval.every == 0 or (step == train_cfg.steps and recipe.eval.steps > 0):
            if recipe.eval.steps > 0:
                last_eval = evaluate(step)
        if step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps:
            save(step)
    log.close()
    summary = _finish(recipe, workdir, step, last_train, last_eval, total, out)
    if recipe.eval.report_batches > 0 and chief:
        from meliad_core.report import long_range_report

        summary["report"] = long_range_report(workdir, batches=recipe.eval.report_batches, out=out)
    return summary


def _nothing_to_do(recipe: Recipe, workdir: Path, step: int, out) -> dict:
    """A run already at (or past) train.steps: nothing is written, the last rows are summarised."""
    rows = read_metrics(workdir / METRICS_NAME)
    last_train = next((r for r in reversed(rows) if r.get("split") == "train" and r["step"] <= step), None)
    last_eval = next((r for r in reversed(rows) if r.get("split") == "eval" and r["step"] <= step), None)
    print(f"nothing to do: the run is already at step {step} of {recipe.train.steps}", file=out, flush=True)
    return _finish(recipe, workdir, step, last_train, last_eval, Accumulator(), out)


def _finish(recipe: Recipe, workdir: Path, step: int, last_train, last_eval, total: Accumulator, out) -> dict:
    tokens_per_second = total.summary()["tokens_per_second"] if total.steps else None
    summary = {"step": step, "train": last_train, "eval": last_eval, "tokens_per_second": tokens_per_second}
    parts = [f"done: {step} steps"]
    if last_train:
        parts.append(f"train {last_train['bits_per_token']:.4f} bits/tok (last {recipe.train.log_every} steps)")
    if last_eval:
        parts.append(f"eval {last_eval['bits_per_token']:.4f} bits/tok ({last_eval['bits_per_char']:.4f} bits/char)")
    if tokens_per_second:
        parts.append(f"{tokens_per_second:,.0f} tokens/s")
    parts.append(f"workdir {workdir}")
    print(" | ".join(parts), file=out, flush=True)
    return summary
