"""Checkpoints that survive a kill at any moment and load on every backend (DESIGN principle 7).

A checkpoint is a folder `WORKDIR/checkpoints/step_<N>/` holding `arrays.npz` (every model variable,
including each stream's caches, memories, recurrent states and dropout seeds, and every optimizer
variable, in creation order) and `manifest.json` (step, data positions, recipe, names, shapes and the
SHA-256 of the arrays). It is written under a temporary name and renamed into place, so a folder with
a final name is always complete; a damaged one (bad hash, a manifest missing a key, arrays that do not
match it) is skipped with a warning and the previous one is used. A write that fails (full disk,
read-only folder) removes its temporary folder and touches no older checkpoint; the temporary folder
of a killed writer is removed by the next run (`remove_temporaries`). Older checkpoints are pruned
only once the new one is in place, so the newest intact checkpoint always survives.
Plain numpy arrays and JSON only: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "meliad.checkpoint/1"
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp_step_"  # a checkpoint being written: .tmp_step_<N>_<pid>
_OLD_PREFIX = ".old_step_"  # a damaged step_<N> set aside while a new one replaces it


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


HOST_PREFIX = "host/"  # arrays of host-side memory stores (model.host_state())


def _to_numpy(variable) -> np.ndarray:
    import keras

    value = variable.value
    if keras.backend.backend() == "jax" and keras.distribution.distribution() is not None:
        from meliad_core.distribution import host_value

        return host_value(value)  # gathered when sharded over several hosts
    return np.array(keras.ops.convert_to_numpy(value), copy=True)


def checkpoint_arrays(model, optimizer) -> dict[str, np.ndarray]:
    """Every variable of the model and the optimizer (and the host stores' state) as numpy arrays.

    In a multi-host run every process calls this at the same point (values sharded over hosts are
    gathered, a collective), and process 0 passes the result to `save_checkpoint`.
    """
    arrays = {f"model_{i:05d}": _to_numpy(v) for i, v in enumerate(model.variables)}
    arrays.update({f"optimizer_{i:05d}": _to_numpy(v) for i, v in enumerate(optimizer.variables)})
    host = model.host_state() if hasattr(model, "host_state") else {}  # host memory stores (their own state)
    arrays.update({f"{HOST_PREFIX}{key}": value for key, value in host.items()})
    return arrays


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _describe(variables) -> list[dict]:
    return [{"name": v.path, "shape": list(v.shape), "dtype": str(v.dtype)} for v in variables]


def _fsync_dir(path: Path) -> None:
    """Makes a rename inside `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(workdir: Path, step: int, model, optimizer, extra: dict[str, Any], keep: int = 3,
                    arrays: dict[str, np.ndarray] | None = None) -> Path:
    """Writes the checkpoint for `step` atomically and keeps only the newest `keep`.

    `arrays`: `checkpoint_arrays(model, optimizer)` when already taken (a multi-host run's process 0).

    Everything is written into `.tmp_step_<N>_<pid>/` and renamed into place; if anything fails (a
    full disk, a read-only folder) the temporary folder is removed and the error raised, and no older
    checkpoint has been touched. Older checkpoints are pruned only after the new one is in place, and
    folders of later steps (left by a run that was resumed from an earlier checkpoint) are not pruned:
    training replaces them when it gets there.
    """
    root = Path(workdir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f"{_TMP_PREFIX}{step}_{os.getpid()}"
    old = root / f"{_OLD_PREFIX}{step}_{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        if arrays is None:
            arrays = checkpoint_arrays(model, optimizer)
        with open(tmp / "arrays.npz", "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        del arrays
        manifest = {
            "format": FORMAT,
            "step": step,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model_variables": _describe(model.variables),
            "optimizer_variables": _describe(optimizer.variables),
            "arrays_sha256": _sha256(tmp / "arrays.npz"),
            **extra,
        }
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a damaged folder of this step (or one from before a --restart): set aside first
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    older = [p for p in list_checkpoints(workdir) if _step_of(p) < step]
    for path in older[max(keep - 1, 0):]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def list_checkpoints(workdir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest first."""
    root = Path(workdir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def remove_temporaries(workdir: Path) -> int:
    """Removes the temporary folders of checkpoint writes that never finished (a killed or failed
    writer); only safe while no other run writes to this workdir. Returns how many were removed."""
    root = Path(workdir) / CHECKPOINT_DIR
    if not root.is_dir():
        return 0
    stale = [p for p in root.iterdir() if p.name.startswith((_TMP_PREFIX, _OLD_PREFIX))]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(stale)


def _check_manifest(path: Path, manifest: Any, arrays: dict | None = None) -> None:
    """Raises CheckpointError unless the manifest has every key a checkpoint needs, well formed."""
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: the manifest is a {type(manifest).__name__}, expected a JSON object")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    step = manifest.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: the manifest's step is {step!r}, expected a non-negative integer")
    if _NAME.match(path.name) and _step_of(path) != step:
        raise CheckpointError(f"{path}: the manifest is for step {step}, not the folder's step")
    if not isinstance(manifest.get("arrays_sha256"), str):
        raise CheckpointError(f"{path}: the manifest has no 'arrays_sha256' key")
    for kind in ("model", "optimizer"):
        described = manifest.get(f"{kind}_variables")
        if not isinstance(described, list) or not all(
                isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("shape"), list)
                for d in described):
            raise CheckpointError(f"{path}: the manifest's '{kind}_variables' key is missing or malformed")
        if arrays is None:
            continue
        for i, info in enumerate(described):
            array = arrays.get(f"{kind}_{i:05d}")
            if array is None or list(array.shape) != list(info["shape"]):
                raise CheckpointError(f"{path}: arrays.npz has no {kind} variable {i} of shape {info['shape']}")


def read_checkpoint(path: Path, check=None) -> tuple[dict, dict[str, np.ndarray]]:
    """The manifest and arrays of one checkpoint, after checking its form and hash; raises CheckpointError.

    `check(path, manifest)`, if given, may raise CheckpointError for keys a caller needs (a run's data
    positions, say) before the arrays are read.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({' '.join(str(exc).split())})") from None
    _check_manifest(path, manifest)
    if check is not None:
        check(path, manifest)
    arrays_path = path / "arrays.npz"
    try:
        if _sha256(arrays_path) != manifest["arrays_sha256"]:
            raise CheckpointError(f"{path}: arrays.npz does not match its recorded SHA-256 (damaged or partial)")
        with np.load(arrays_path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: unreadable arrays ({' '.join(str(exc).split())})") from None
    _check_manifest(path, manifest, arrays)
    return manifest, arrays


def stored_recipe(path, manifest: dict):
    """The recipe a checkpoint was trained with, in today's keys (`migrate_stored_recipe`, as a resumed
    run reads it) and validated; CheckpointError with one line when the manifest holds none or it is
    not valid here. Every reader of a run's recipe (report, eval, generate, the probes) goes through it."""
    from meliad_core.config import RecipeError, migrate_stored_recipe, validate_recipe

    mapping = manifest.get("recipe")
    if not isinstance(mapping, dict):
        raise CheckpointError(f"{path}: the checkpoint's manifest holds no recipe")
    try:
        return validate_recipe(migrate_stored_recipe(mapping))
    except RecipeError as exc:
        raise CheckpointError(f"{path}: the checkpoint's recipe is not valid here ({exc})") from None


def latest_valid_checkpoint(workdir: Path, warn=print, check=None) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint that reads back intact; damaged ones are reported with `warn` and skipped.
    `check`: see `read_checkpoint`."""
    for path in list_checkpoints(workdir):
        try:
            manifest, arrays = read_checkpoint(path, check)
        except CheckpointError as exc:
            warn(f"skipping checkpoint: {exc}")
            continue
        return path, manifest, arrays
    return None


# Weight paths of v0.1 checkpoints -> today's (the mechanisms became layers of their own in v0.2).
# Separators are "/" in model paths and "_" in optimizer slot names.
LEGACY_PATHS = (
    (re.compile(r"(transformer\d+)([/_])relative_positions"), r"\1\2attention\2relative_positions"),
    (re.compile(r"(transformer\d+)([/_])external_memory_bias"), r"\1\2memory\2external_memory_bias"),
)


def _plain_name(name: str) -> str:
    """A variable's name as today's model calls it: legacy paths migrated, and names that depend on
    creation counters (seed generators) compared without the counter."""
    for pattern, replacement in LEGACY_PATHS:
        name = pattern.sub(replacement, name)
    return re.sub(r"seed_generator(_\d+)?", "seed_generator", name)


def _assign(kind: str, variables, described: list[dict], arrays: dict, prefix: str) -> None:
    if len(variables) != len(described):
        raise CheckpointError(f"the checkpoint has {len(described)} {kind} variables, this run has {len(variables)}: "
                              "it was written for a different recipe")
    # by name (legacy paths migrated), then by position among equal names (seed generators)
    by_name: dict[str, list[int]] = {}
    for i, info in enumerate(described):
        by_name.setdefault(_plain_name(info["name"]), []).append(i)
    for var in variables:
        candidates = by_name.get(_plain_name(var.path))
        i = candidates.pop(0) if candidates else None
        if i is None or tuple(var.shape) != tuple(described[i]["shape"]):
            found = "" if i is None else f" (it holds {tuple(described[i]['shape'])})"
            raise CheckpointError(f"the checkpoint has no {kind} variable {var.path} {tuple(var.shape)}{found}: "
                                  "it was written for a different recipe")
        var.assign(arrays[f"{prefix}_{i:05d}"].astype(str(var.dtype)))  # dtypes may differ by backend


def restore(model, optimizer, manifest: dict, arrays: dict, weights_only: bool = False) -> None:
    """Loads a checkpoint into a built model (and built optimizer). With weights_only, only the
    trainable weights are taken (for --load-dir: a new run from another run's weights)."""
    described = manifest["model_variables"]
    if weights_only:
        by_name = {_plain_name(d["name"]): i for i, d in enumerate(described)}
        for var in model.trainable_variables:
            i = by_name.get(_plain_name(var.path))
            if i is None or tuple(described[i]["shape"]) != tuple(var.shape):
                raise CheckpointError(f"the checkpoint has no weight {var.path} {tuple(var.shape)}: "
                                      "it was written for a different model")
            var.assign(arrays[f"model_{i:05d}"])
        return
    _assign("model", model.variables, described, arrays, "model")
    _assign("optimizer", optimizer.variables, manifest["optimizer_variables"], arrays, "optimizer")
    if hasattr(model, "load_host_state"):
        model.load_host_state({k[len(HOST_PREFIX):]: v for k, v in arrays.items() if k.startswith(HOST_PREFIX)})
