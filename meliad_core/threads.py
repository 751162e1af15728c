"""CPU thread settings for the active Keras backend, robust on a busy machine.

    from meliad_core.threads import configure_threads
    configure_threads()            # MELIAD_THREADS, else meliad's default for the backend
    configure_threads(1)           # one intra-op thread
    configure_threads("default")   # leave the framework's own settings alone

Call it as early as possible: before Keras (and so the framework) is imported, every backend can be
configured; afterwards only what the framework still accepts is applied, and the rest is reported in
the returned settings' `notes` (nothing raises). This module imports no framework at import time, and
in the call only the active backend's, and only if it is already imported (an import would be too
early for nothing and too late for the environment variables).

What each backend allows:
  - torch: `torch.set_num_threads` at any time; `set_num_interop_threads` only before any inter-op
    work (else skipped, noted). Before torch is imported, OMP_NUM_THREADS is set too, and
    OMP_WAIT_POLICY=PASSIVE (unless the user set one): idle OpenMP workers sleep instead of spinning,
    so on a busy machine they do not take turns away from the thread doing the work.
  - tensorflow: `tf.config.threading.set_{intra,inter}_op_parallelism_threads` before its runtime
    starts (the first op); before TF is imported, TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS.
  - jax: XLA's CPU client reads XLA_FLAGS once, when it is created (the first computation), and
    knows only "all cores" or "one thread" (`--xla_cpu_multi_thread_eigen=false`); so with 1 thread
    the flag is added to XLA_FLAGS if the client does not exist yet, and otherwise it is noted that
    it is too late. More than one thread means XLA's default (all usable cores).

Defaults ("auto"): on a machine with at most 2 usable cores, torch gets 1 intra-op thread (its
OpenMP threads wait on each other for milliseconds per op whenever a core is taken by another
process); jax and tensorflow keep their own defaults (their pools block instead of spinning; a
tensorflow inter-op pool of 1 was measured 1.5x slower on a quiet 2-core machine and no better with a
competing process, README "Speed notes"). On larger machines every backend uses all usable cores. MELIAD_THREADS=N (or `configure_threads(N)`) sets N intra-op threads everywhere,
MELIAD_THREADS=N,M also the inter-op threads, and MELIAD_THREADS=default changes nothing.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

ENV = "MELIAD_THREADS"
SMALL_MACHINE = 2  # usable cores at or below which the busy-machine defaults apply
_JAX_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false"


@dataclass
class ThreadSettings:
    backend: str
    intra: int | None  # None: the framework's default
    interop: int | None
    source: str  # "argument", "MELIAD_THREADS" or "auto"
    applied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        what = "framework defaults" if self.intra is None and self.interop is None else (
            f"intra-op {self.intra or 'default'}, inter-op {self.interop or 'default'}")
        text = f"threads ({self.backend}, {self.source}): {what}"
        return text + (f" [{'; '.join(self.notes)}]" if self.notes else "")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def active_backend(backend: str | None = None) -> str:
    """The Keras backend, found without importing Keras: argument, imported Keras, KERAS_BACKEND,
    ~/.keras/keras.json, else Keras' default (tensorflow)."""
    if backend:
        return backend
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        try:
            return keras.backend.backend()
        except Exception:  # a half-imported keras
            pass
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def parse_threads(value) -> tuple[int | None, int | None] | str:
    """`auto` / `default` (returned as such), N, or "N,M" -> (intra, interop). Raises ValueError."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    text = str(value).strip().lower()
    if text in ("", "auto"):
        return "auto"
    if text in ("default", "none", "0"):
        return "default"
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"{ENV}: got {value!r}, expected 'auto', 'default', N or N,M with N, M >= 1")
    return int(parts[0]), (int(parts[1]) if len(parts) == 2 else None)


def default_threads(backend: str, cores: int | None = None) -> tuple[int | None, int | None]:
    """meliad's default (intra, interop) for a backend on a machine with `cores` usable cores."""
    cores = cores or usable_cores()
    if cores > SMALL_MACHINE:
        return (cores, None) if backend != "jax" else (None, None)
    if backend == "torch":
        return 1, 1
    return None, None  # jax: XLA's own pool over all usable cores; tensorflow: its own pools


def configure_threads(threads=None, backend: str | None = None) -> ThreadSettings:
    """Applies thread settings for `backend` (default: the active one); see the module docstring.

    threads: None (MELIAD_THREADS, else "auto"), "auto", "default", N or "N,M".
    """
    backend = active_backend(backend)
    if threads is not None:
        source, value = "argument", threads
    elif os.environ.get(ENV, "").strip():
        source, value = ENV, os.environ[ENV]
    else:
        source, value = "auto", "auto"
    parsed = parse_threads(value)
    if parsed == "default":
        return ThreadSettings(backend, None, None, source)
    intra, interop = default_threads(backend) if parsed == "auto" else parsed
    settings = ThreadSettings(backend, intra, interop, source)
    {"torch": _torch, "tensorflow": _tensorflow, "jax": _jax}.get(backend, lambda s: None)(settings)
    return settings


def _setenv(settings: ThreadSettings, name: str, value: str, *, keep_user: bool = False) -> None:
    if keep_user and name in os.environ:
        return
    os.environ[name] = value
    settings.applied.append(f"{name}={value}")


def _torch(settings: ThreadSettings) -> None:
    if "torch" not in sys.modules:
        if settings.intra:
            _setenv(settings, "OMP_NUM_THREADS", str(settings.intra))
        _setenv(settings, "OMP_WAIT_POLICY", "PASSIVE", keep_user=True)  # read once, when OpenMP loads
        return
    import torch

    if settings.intra and torch.get_num_threads() != settings.intra:
        torch.set_num_threads(settings.intra)
        settings.applied.append(f"torch.set_num_threads({settings.intra})")
    if settings.interop and torch.get_num_interop_threads() != settings.interop:
        try:
            torch.set_num_interop_threads(settings.interop)
            settings.applied.append(f"torch.set_num_interop_threads({settings.interop})")
        except RuntimeError:
            settings.notes.append("inter-op threads already in use: left at "
                                  f"{torch.get_num_interop_threads()}")


def _tensorflow(settings: ThreadSettings) -> None:
    if "tensorflow" not in sys.modules:
        if settings.intra:
            _setenv(settings, "TF_NUM_INTRAOP_THREADS", str(settings.intra))
        if settings.interop:
            _setenv(settings, "TF_NUM_INTEROP_THREADS", str(settings.interop))
        return
    import tensorflow as tf

    for kind, n in (("intra", settings.intra), ("inter", settings.interop)):
        if not n:
            continue
        get = getattr(tf.config.threading, f"get_{kind}_op_parallelism_threads")
        if get() == n:
            continue
        try:
            getattr(tf.config.threading, f"set_{kind}_op_parallelism_threads")(n)
            settings.applied.append(f"tf.config.threading.set_{kind}_op_parallelism_threads({n})")
        except RuntimeError:
            settings.notes.append(f"TensorFlow already started: {kind}-op threads left at {get() or 'default'}")


def _jax_client_exists() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(bridge is not None and getattr(bridge, "_backends", None))


def _jax(settings: ThreadSettings) -> None:
    if settings.interop:
        settings.notes.append("XLA has no inter-op thread setting: ignored")
    if settings.intra is None or settings.intra > 1:
        if settings.intra is not None and settings.intra < usable_cores():
            settings.notes.append(f"XLA on CPU uses 1 or all {usable_cores()} usable cores: all")
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if _JAX_ONE_THREAD in flags:
        return
    if _jax_client_exists():
        settings.notes.append("JAX already started its CPU client: one thread needs MELIAD_THREADS=1 set "
                              "before the first computation")
        return
    _setenv(settings, "XLA_FLAGS", f"{flags} {_JAX_ONE_THREAD}".strip())
