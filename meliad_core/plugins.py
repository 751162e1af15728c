"""The plugin manager: discovers `meliad` entry points and keeps registries by kind and name.

Built-in plugins are found through the same entry-point group as third-party ones, so the
extension API is exercised by every run. Set MELIAD_DISABLE_PLUGINS=name1,name2 to skip plugins
by entry-point name.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pluggy

from meliad_core import hookspecs
from meliad_core.units import one_line

ENTRY_POINT_GROUP = "meliad"

# kind name -> hook that registers things of that kind
KINDS = {
    "attention_kernel": "meliad_register_attention_kernels",
    "memory_store": "meliad_register_memory_stores",
    "recurrence_gate": "meliad_register_recurrence_gates",
    "position_bias": "meliad_register_position_biases",
    "data_source": "meliad_register_data_sources",
    "vocabulary": "meliad_register_vocabularies",
    "sampler": "meliad_register_samplers",
}


class PluginError(LookupError):
    """An unknown name, or a plugin that is not usable; the message is one line for the user."""


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    obj: Any
    plugin: str  # entry-point name
    distribution: str
    version: str
    backends: tuple[str, ...] | None = None  # None: every backend
    available_check: Callable[[], str | None] | None = None
    description: str = ""
    options: dict | None = None  # name -> meliad_core.options.Option the plugin declares

    def serves(self, backend: str) -> bool:
        return self.backends is None or backend in self.backends

    def unavailable_reason(self, backend: str | None = None) -> str | None:
        """None when usable now (on `backend`, if given); else a one-line reason."""
        if backend is not None and not self.serves(backend):
            return f"serves {', '.join(self.backends or ())} only"
        if self.available_check is None:
            return None
        try:
            return self.available_check()
        except Exception as exc:  # a broken check must not take the listing down
            return f"availability check failed: {exc}"


@dataclass
class Failure:
    plugin: str
    distribution: str
    stage: str  # "import" or the hook name
    error: str


@dataclass
class PluginManager:
    pm: pluggy.PluginManager
    origins: dict[str, tuple[str, str]]  # plugin name -> (distribution, version)
    failures: list[Failure] = field(default_factory=list)
    _registries: dict[str, dict[str, Entry]] = field(default_factory=dict)
    _recipe_dirs: list[Path] | None = None

    # -- registries --------------------------------------------------------------------------

    def registry(self, kind: str) -> dict[str, Entry]:
        if kind not in KINDS:
            raise PluginError(f"unknown plugin kind {kind!r}; known kinds: {', '.join(KINDS)}")
        if kind not in self._registries:
            self._registries[kind] = self._collect(kind)
        return self._registries[kind]

    def _collect(self, kind: str) -> dict[str, Entry]:
        entries: dict[str, Entry] = {}
        hook_name = KINDS[kind]
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            plugin = impl.plugin_name
            dist, version = self.origins.get(plugin, ("unknown", ""))

            def register(name, obj, *, backends=None, available=None, description="", options=None, _p=plugin,
                         _d=dist, _v=version):
                if name in entries:
                    prior = entries[name]
                    self.failures.append(Failure(_p, _d, hook_name,
                                                 f"{kind} {name!r} is already registered by {prior.plugin}"))
                    return
                entries[name] = Entry(kind, name, obj, _p, _d, _v, tuple(backends) if backends is not None else None,
                                      available, description, dict(options) if options else None)

            try:
                impl.function(register=register)
            except Exception as exc:
                self.failures.append(Failure(plugin, dist, hook_name, one_line(exc)))
        return entries

    def get(self, kind: str, name: str) -> Entry:
        registry = self.registry(kind)
        if name not in registry:
            known = ", ".join(sorted(registry)) or "none"
            raise PluginError(f"unknown {kind.replace('_', ' ')} {name!r}; known: {known}")
        return registry[name]

    def names(self, kind: str) -> list[str]:
        return sorted(self.registry(kind))

    def entries(self) -> list[Entry]:
        return [entry for kind in KINDS for entry in self.registry(kind).values()]

    # -- other hooks ---------------------------------------------------------------------------

    def recipe_dirs(self) -> list[Path]:
        """Folders plugins add for recipes; asked once, so a failing hook is reported once."""
        if self._recipe_dirs is not None:
            return list(self._recipe_dirs)
        dirs: list[Path] = []
        for impl in self.pm.hook.meliad_recipe_dirs.get_hookimpls():
            try:
                dirs.extend(Path(p) for p in (impl.function() or []))
            except Exception as exc:
                dist, _ = self.origins.get(impl.plugin_name, ("unknown", ""))
                self.failures.append(Failure(impl.plugin_name, dist, "meliad_recipe_dirs", one_line(exc)))
        self._recipe_dirs = dirs
        return list(dirs)

    def add_commands(self, cli) -> None:
        """Lets each plugin add commands to the click group `cli`; none may replace an existing one."""
        commands = getattr(cli, "commands", None)
        for impl in self.pm.hook.meliad_register_commands.get_hookimpls():
            dist, _ = self.origins.get(impl.plugin_name, ("unknown", ""))
            before = dict(commands) if commands is not None else {}
            try:
                impl.function(cli=cli)
            except Exception as exc:
                self.failures.append(Failure(impl.plugin_name, dist, "meliad_register_commands", one_line(exc)))
            for name, command in before.items():
                if commands is not None and commands.get(name) is not command:
                    commands[name] = command
                    self.failures.append(Failure(impl.plugin_name, dist, "meliad_register_commands",
                                                 f"tried to replace the command {name!r}; kept the original"))


def _disabled() -> set[str]:
    return {n.strip() for n in os.environ.get("MELIAD_DISABLE_PLUGINS", "").split(",") if n.strip()}


def load_plugin_manager(extra_plugins: list[tuple[str, Any]] | None = None) -> PluginManager:
    """Builds a fresh manager from the installed entry points (plus `extra_plugins`, for tests)."""
    pm = pluggy.PluginManager("meliad")
    pm.add_hookspecs(hookspecs)
    manager = PluginManager(pm=pm, origins={})
    disabled = _disabled()
    # By name; for a name two distributions use, meliad's own first, so a third party cannot shadow it.
    def order(ep: importlib.metadata.EntryPoint) -> tuple[str, bool]:
        return ep.name, ep.dist is None or ep.dist.name != "meliad"

    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=order):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else ""
        if ep.name in disabled:
            continue
        if ep.name in manager.origins:
            other = manager.origins[ep.name][0]
            manager.failures.append(Failure(ep.name, dist, "register",
                                            f"entry-point name {ep.name!r} is already used by {other}; skipped"))
            continue
        try:
            module = ep.load()
        except Exception as exc:
            manager.failures.append(Failure(ep.name, dist, "import", one_line(exc)))
            continue
        try:
            pm.register(module, name=ep.name)
        except Exception as exc:
            manager.failures.append(Failure(ep.name, dist, "register", one_line(exc)))
            continue
        manager.origins[ep.name] = (dist, version)
    from meliad_core import __version__, core_plugin

    pm.register(core_plugin, name=core_plugin.CORE_PLUGIN)
    manager.origins[core_plugin.CORE_PLUGIN] = ("meliad", __version__)
    for name, module in extra_plugins or []:
        pm.register(module, name=name)
        manager.origins[name] = ("(in process)", "")
    return manager


_MANAGER: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide manager, loaded on first use."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = load_plugin_manager()
    return _MANAGER


def set_plugin_manager(manager: PluginManager | None) -> None:
    """Replaces the process-wide manager (tests use this); None reloads on next use."""
    global _MANAGER
    _MANAGER = manager


class LazyObject:
    """Stands for `module:Class()` until first used, so registering a plugin imports no heavy module.

    Plugins register these instead of instances whose modules import Keras: listing plugins or
    validating a recipe then imports nothing, and the chosen backend's framework loads only when a
    model is built.
    """

    def __init__(self, target: str):
        self._target = target
        self._instance = None

    def _resolve(self):
        if self._instance is None:
            import importlib

            module, _, attr = self._target.partition(":")
            self._instance = getattr(importlib.import_module(module), attr)()
        return self._instance

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._resolve(), name)

    def __repr__(self) -> str:
        return f"LazyObject({self._target!r})"

