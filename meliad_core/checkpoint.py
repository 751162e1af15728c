"""Checkpoints that survive a kill at any moment and load on every backend (DESIGN principle 7).

A checkpoint is a folder `WORKDIR/checkpoints/step_<N>/` holding `arrays.npz` (every model variable,
including each stream's caches, memories, recurrent states and dropout seeds, and every optimizer
variable, in creation order) and `manifest.json` (step, data positions, recipe, names, shapes and the
SHA-256 of the arrays). It is written under a temporary name and renamed into place, so a folder with
a final name is always complete; a damaged one fails its hash check and the previous one is used.
Plain numpy arrays and JSON only: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "meliad.checkpoint/1"
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


def _to_numpy(variable) -> np.ndarray:
    import keras

    return np.array(keras.ops.convert_to_numpy(variable.value), copy=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _describe(variables) -> list[dict]:
    return [{"name": v.path, "shape": list(v.shape), "dtype": str(v.dtype)} for v in variables]


def save_checkpoint(workdir: Path, step: int, model, optimizer, extra: dict[str, Any], keep: int = 3) -> Path:
    """Writes the checkpoint for `step` atomically and keeps only the newest `keep`."""
    root = Path(workdir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    arrays = {f"model_{i:05d}": _to_numpy(v) for i, v in enumerate(model.variables)}
    arrays.update({f"optimizer_{i:05d}": _to_numpy(v) for i, v in enumerate(optimizer.variables)})
    with open(tmp / "arrays.npz", "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
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
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(workdir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(workdir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest first."""
    root = Path(workdir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def read_checkpoint(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The manifest and arrays of one checkpoint, after checking its hash; raises CheckpointError."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    arrays_path = path / "arrays.npz"
    try:
        if _sha256(arrays_path) != manifest.get("arrays_sha256"):
            raise CheckpointError(f"{path}: arrays.npz does not match its recorded SHA-256 (damaged or partial)")
        with np.load(arrays_path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable arrays ({exc})") from None
    return manifest, arrays


def latest_valid_checkpoint(workdir: Path, warn=print) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint that reads back intact; damaged ones are reported with `warn` and skipped."""
    for path in list_checkpoints(workdir):
        try:
            manifest, arrays = read_checkpoint(path)
        except CheckpointError as exc:
            warn(f"skipping checkpoint: {exc}")
            continue
        return path, manifest, arrays
    return None


def _plain_name(name: str) -> str:
    """Names that depend on creation counters (seed generators) are compared without the counter."""
    return re.sub(r"seed_generator(_\d+)?", "seed_generator", name)


def _assign(kind: str, variables, described: list[dict], arrays: dict, prefix: str) -> None:
    if len(variables) != len(described):
        raise CheckpointError(f"the checkpoint has {len(described)} {kind} variables, this run has {len(variables)}: "
                              "it was written for a different recipe")
    for i, (var, info) in enumerate(zip(variables, described)):
        if tuple(var.shape) != tuple(info["shape"]) or _plain_name(var.path) != _plain_name(info["name"]):
            raise CheckpointError(f"{kind} variable {i} is {info['name']} {tuple(info['shape'])} in the checkpoint "
                                  f"but {var.path} {tuple(var.shape)} here: it was written for a different recipe")
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
