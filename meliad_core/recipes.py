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
from meliad_core import assemble, plugins
from meliad_core.config import Recipe, RecipeError, validate_recipe

__all__ = [
    "RecipeError",
    "apply_override",
    "bundled_recipes_dir",
    "deep_merge",
    "find_recipe",
    "list_bundled_recipes",
    "list_recipes",
    "load_recipe",
    "parse_override",
    "recipe_search_dirs",
    "resolve_recipe_mapping",
]

_FILE_KEYS = ("name", "description")  # describe one file; not inherited through include
WORKDIR_RECIPE = "recipe.yaml"  # the resolved recipe a run writes into its workdir (meliad_core.runner)
# Bounds on what a recipe file may hold, so that a hostile or broken file stops with one line
MAX_FILE_BYTES = 1 << 20  # a recipe is a few kilobytes
MAX_VALUES = 10_000  # values in one file or --set value, YAML aliases expanded (alias "bombs")
MAX_DEPTH = 16  # nesting of mappings and lists (a recipe needs 4)
MAX_INCLUDE_DEPTH = 16  # a chain of includes
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
    folder = base / text
    if relative_to is None and folder.is_dir():  # `meliad run WORKDIR`: the run's own resolved recipe
        if (folder / WORKDIR_RECIPE).is_file():
            return (folder / WORKDIR_RECIPE).resolve()
        raise RecipeError(f"recipe {text!r}: is a folder, not a recipe file (nor a run's workdir: it holds no "
                          f"{WORKDIR_RECIPE})")
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


class _RecipeLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then overrides: allowed
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the safe loader's own error follows
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first + 1}, again at line "
                        f"{key_node.start_mark.line + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_error(where: str, exc: yaml.YAMLError, lines: bool) -> RecipeError:
    mark = getattr(exc, "problem_mark", None)
    where = f"{where}:{mark.line + 1}" if mark is not None and lines else where
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return RecipeError(f"{where}: invalid YAML{'' if lines else ' value'}: {' '.join(str(detail).split())}")


def parse_yaml(text: str, where: str, lines: bool = True) -> Any:
    """One YAML document with yaml's safe loader, bounded: duplicate keys, YAML alias "bombs" (more than
    MAX_VALUES values once aliases are expanded), self-referencing aliases and nesting deeper than
    MAX_DEPTH are refused with one-line `RecipeError`s that name `where` (a file, or a --set)."""
    loader = None
    try:
        loader = _RecipeLoader(text)  # the reader refuses control characters right here
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise _yaml_error(where, exc, lines) from None
    except RecursionError:
        raise RecipeError(f"{where}: nested too deeply (a recipe may nest at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise RecipeError(f"{where}: invalid value: {' '.join(str(exc).split())}") from None
    finally:
        if loader is not None:
            loader.dispose()
    _check_structure(data, where)
    return data


def _check_structure(data: Any, where: str) -> None:
    """Counts the values of `data` as a tree (aliases expanded, each shared node counted once per use)."""
    sizes: dict[int, tuple[int, int]] = {}  # id -> (values, height) of containers already counted
    active: set[int] = set()

    def visit(value: Any, depth: int) -> tuple[int, int]:
        if not isinstance(value, (dict, list)):
            return 1, 0
        key = id(value)
        if key in active:
            raise RecipeError(f"{where}: a YAML alias refers to a value that contains it (a cycle)")
        if key not in sizes:
            if depth >= MAX_DEPTH:
                raise RecipeError(f"{where}: nested more than {MAX_DEPTH} levels deep")
            active.add(key)
            total, height = 1, 0
            for child in (value.values() if isinstance(value, dict) else value):
                count, child_height = visit(child, depth + 1)
                total, height = total + count, max(height, child_height + 1)
                if total > MAX_VALUES:
                    raise RecipeError(f"{where}: more than {MAX_VALUES} values once YAML aliases are expanded; "
                                      "a recipe is a few hundred at most")
            active.discard(key)
            sizes[key] = (total, height)
        total, height = sizes[key]
        if depth + height > MAX_DEPTH:
            raise RecipeError(f"{where}: nested more than {MAX_DEPTH} levels deep")
        return total, height

    visit(data, 0)


def _read_yaml(path: Path) -> dict:
    """One recipe file as a mapping; YAML errors become one line with the file and line number.
    Empty files (or only comments, or `null`) and files over MAX_FILE_BYTES are refused."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # never more, whatever the file claims to be
        if len(raw) > MAX_FILE_BYTES:
            raise RecipeError(f"{path}: more than {MAX_FILE_BYTES} bytes, expected a recipe file of at most "
                              f"{MAX_FILE_BYTES} bytes")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {' '.join(str(exc).split())}") from None
    data = parse_yaml(text, str(path))
    if data is None:
        raise RecipeError(f"{path}: empty recipe (no sections; only comments or null), expected a mapping of "
                          "recipe sections")
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
    if len(stack) >= MAX_INCLUDE_DEPTH:
        raise RecipeError(f"{path}: includes nested more than {MAX_INCLUDE_DEPTH} files deep "
                          f"(from {stack[0].name})")
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
    if len(raw) > MAX_FILE_BYTES:
        raise RecipeError(f"--set {key}=...: a value of {len(raw)} characters, expected at most {MAX_FILE_BYTES}")
    value = parse_yaml(raw, f"--set {text[:80]!r}", lines=False)
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
        assemble.check_recipe(recipe, backend)
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
