"""Loading recipes: YAML files composed with `include:`, overridden with `--set key=value`.

A recipe is resolved in four steps, each of which stops with a one-line `RecipeError`:

1. read the file with `yaml.safe_load` (never the unsafe loaders: a recipe is data);
2. deep-merge its `include:`s in order, then its own keys (later wins);
3. apply `--set a.b=value` overrides, each value parsed as a YAML scalar or flow value;
4. validate into a `config.Recipe`, then check every plugin name against the installed registries.

Includes name either a path relative to the including file or a bare recipe name (`sizes/tiny_test`,
with or without `.yaml`) looked up in the bundled `recipes/` folder and in the folders that plugins
add through the `meliad_recipe_dirs` hook. `name` and `description` describe one file, so they are
not inherited from includes; a recipe without a `name` is named after its file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import yaml

import meliad_core
from meliad_core import plugins
from meliad_core.config import Recipe, RecipeError, validate_recipe

__all__ = [
    "PLUGIN_KEYS",
    "RecipeError",
    "apply_override",
    "bundled_recipes_dir",
    "check_plugin_names",
    "deep_merge",
    "find_recipe",
    "list_bundled_recipes",
    "list_recipes",
    "load_recipe",
    "parse_override",
    "recipe_search_dirs",
    "resolve_recipe_mapping",
]

# (section, key) -> plugin kind whose registry must hold the recipe's value
PLUGIN_KEYS: dict[tuple[str, str], str] = {
    ("model", "position_bias"): "position_bias",
    ("attention", "kernel"): "attention_kernel",
    ("memory", "store"): "memory_store",
    ("recurrence", "gate"): "recurrence_gate",
    ("data", "source"): "data_source",
    ("data", "vocabulary"): "vocabulary",
}

_PLURALS = {
    "position_bias": "position biases",
    "attention_kernel": "attention kernels",
    "memory_store": "memory stores",
    "recurrence_gate": "recurrence gates",
    "data_source": "data sources",
    "vocabulary": "vocabularies",
}

_FILE_KEYS = ("name", "description")  # describe one file; not inherited through include
_KEY_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


# ----------------------------------------------------------------------------------------------
# Finding recipe files


def bundled_recipes_dir() -> Path:
    """The `recipes/` folder at the top of the source tree (next to `meliad_core/`)."""
    return Path(meliad_core.__file__).resolve().parent.parent / "recipes"


def recipe_search_dirs() -> list[Path]:
    """Folders searched for bare recipe names: bundled first, then those plugins provide."""
    dirs = [bundled_recipes_dir()]
    for extra in plugins.get_plugin_manager().recipe_dirs():
        if extra not in dirs:
            dirs.append(extra)
    return dirs


def _candidates(base: Path, name: str) -> list[Path]:
    path = base / name
    return [path] if path.suffix in (".yaml", ".yml") else [path, path.with_name(path.name + ".yaml")]


def find_recipe(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """The recipe file that `name_or_path` means, or a one-line `RecipeError`.

    A path is tried first (relative to `relative_to`, the including file's folder, or to the working
    directory); then the name is looked up in `recipe_search_dirs()`.
    """
    text = str(name_or_path)
    if not text.strip():
        raise RecipeError("recipe: got an empty name, expected a recipe file or a bundled recipe name")
    base = relative_to if relative_to is not None else Path.cwd()
    for candidate in _candidates(base, text):
        if candidate.is_file():
            return candidate.resolve()
    dirs = recipe_search_dirs()
    if not Path(text).is_absolute():
        for folder in dirs:
            for candidate in _candidates(folder, text):
                if candidate.is_file():
                    return candidate.resolve()
    where = f"relative to {base}" + "".join(f" or in {d}" for d in dirs)
    raise RecipeError(f"recipe {text!r}: no such file ({where}); 'meliad recipes' lists the bundled ones")


# ----------------------------------------------------------------------------------------------
# Reading and merging


def _read_yaml(path: Path) -> dict:
    """One recipe file as a mapping; YAML errors become one line with the file and line number."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise RecipeError(f"{where}: invalid YAML: {' '.join(str(detail).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: got a {type(data).__name__} document, expected a mapping of recipe sections")
    return data


def deep_merge(base: dict, update: dict) -> dict:
    """A new mapping: `update` merged into `base`, nested mappings merged, anything else replaced."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _includes(data: dict, path: Path) -> list[str]:
    include = data.get("include")
    if include is None:
        return []
    if isinstance(include, str):
        return [include]
    if isinstance(include, list) and all(isinstance(item, str) for item in include):
        return list(include)
    raise RecipeError(f"{path}: include: got {include!r}, expected a recipe name or a list of recipe names")


def _resolve_file(path: Path, stack: tuple[Path, ...]) -> dict:
    if path in stack:
        chain = " -> ".join(p.name for p in (*stack[stack.index(path):], path))
        raise RecipeError(f"{path}: include cycle: {chain}")
    data = _read_yaml(path)
    merged: dict = {}
    for name in _includes(data, path):
        try:
            included = find_recipe(name, relative_to=path.parent)
        except RecipeError:
            raise RecipeError(
                f"{path}: include {name!r}: no such recipe (relative to {path.parent} or among "
                "'meliad recipes')"
            ) from None
        sub = _resolve_file(included, (*stack, path))
        merged = deep_merge(merged, {k: v for k, v in sub.items() if k not in _FILE_KEYS})
    own = {k: v for k, v in data.items() if k != "include"}
    return deep_merge(merged, own)


# ----------------------------------------------------------------------------------------------
# Overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"a.b=value"` -> (["a", "b"], value parsed as YAML), or a one-line `RecipeError`."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not _KEY_PATH.match(key):
        raise RecipeError(f"--set {text!r}: expected key=value with a dotted key, e.g. train.steps=200")
    if key.split(".")[0] == "include":
        raise RecipeError(f"--set {text!r}: include cannot be overridden (overrides apply after includes)")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"--set {text!r}: invalid YAML value: {' '.join(str(problem).split())}") from None
    return key.split("."), value


def apply_override(mapping: dict, text: str) -> dict:
    """A new mapping with one `--set a.b=value` applied; missing or null sections are created."""
    path, value = parse_override(text)
    result = dict(mapping)
    node = result
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, dict):
            dotted = ".".join(path[: depth + 1])
            raise RecipeError(f"--set {text!r}: {dotted} is {child!r}, not a mapping of keys")
        else:
            child = dict(child)
        node[part] = child
        node = child
    node[path[-1]] = value
    return result


# ----------------------------------------------------------------------------------------------
# Public entry points


def resolve_recipe_mapping(name_or_path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """The merged recipe mapping (includes and overrides applied), before validation."""
    path = find_recipe(name_or_path)
    mapping = _resolve_file(path, ())
    if not mapping.get("name"):
        mapping["name"] = path.stem
    for text in overrides:
        mapping = apply_override(mapping, text)
    return mapping


def check_plugin_names(recipe: Recipe, backend: str | None = None) -> None:
    """Raises `RecipeError` if the recipe names a strategy that no installed plugin registers.

    With `backend`, also checks that each named plugin serves that Keras backend and is available.
    """
    manager = plugins.get_plugin_manager()
    for (section, key), kind in PLUGIN_KEYS.items():
        config = getattr(recipe, section)
        if config is None:
            continue
        value = getattr(config, key)
        if kind == "attention_kernel" and value == "auto":
            continue
        registry = manager.registry(kind)
        dotted = f"{section}.{key}"
        if value not in registry:
            known = ", ".join(sorted(registry)) or "none installed"
            failed = {f.plugin for f in manager.failures}
            note = f"; {len(failed)} plugin(s) failed to load, see 'meliad plugins'" if failed else ""
            raise RecipeError(f"{dotted}: got {value!r}, expected one of the installed {_PLURALS[kind]}: "
                              f"{known}{note}")
        if backend is not None:
            entry = registry[value]
            reason = entry.unavailable_reason(backend)
            if reason:
                raise RecipeError(f"{dotted}: got {value!r} (from {entry.distribution}), which is not available "
                                  f"on the {backend} backend: {reason}")


def load_recipe(
    name_or_path: str | Path,
    overrides: Iterable[str] = (),
    *,
    backend: str | None = None,
    check_plugins: bool = True,
) -> Recipe:
    """Resolves, validates and plugin-checks a recipe; every problem is a one-line `RecipeError`."""
    recipe = validate_recipe(resolve_recipe_mapping(name_or_path, overrides))
    if check_plugins:
        check_plugin_names(recipe, backend)
    return recipe


def _description(path: Path) -> str:
    """First line of a recipe's own `description:`, or why it could not be read (never raises)."""
    try:
        data = _read_yaml(path)
    except RecipeError as exc:
        return f"(unreadable: {exc})"
    description = data.get("description")
    if not isinstance(description, str) or not description.strip():
        return ""
    return description.strip().splitlines()[0]


def _recipes_in(folder: Path) -> list[tuple[str, Path, str]]:
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.rglob("*.y*ml")):
        if path.suffix in (".yaml", ".yml") and path.is_file():
            name = path.relative_to(folder).with_suffix("").as_posix()
            found.append((name, path, _description(path)))
    return found


def list_bundled_recipes() -> list[tuple[str, Path, str]]:
    """(name, path, first line of description) of each recipe shipped in `recipes/`."""
    return _recipes_in(bundled_recipes_dir())


def list_recipes() -> list[tuple[str, Path, str]]:
    """Bundled recipes, then those in plugin recipe folders; a name found twice keeps the first."""
    seen: dict[str, tuple[str, Path, str]] = {}
    for folder in recipe_search_dirs():
        for item in _recipes_in(folder):
            seen.setdefault(item[0], item)
    return list(seen.values())
