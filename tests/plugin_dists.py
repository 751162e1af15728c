"""Real plugin distributions for tests, "installed" the way pip would leave them, minus pip: a folder
with the package and a `<name>-<version>.dist-info` (METADATA, entry_points.txt), put on sys.path or
PYTHONPATH by the test."""

from __future__ import annotations

import importlib
import shutil
import textwrap
import tomllib
from pathlib import Path

THIRD_PARTY = Path(__file__).resolve().parent / "third_party_plugin"


def make_distribution(root: Path, name: str, version: str, entry_points: dict[str, str],
                      modules: dict[str, str] | None = None, packages: dict[str, Path] | None = None) -> Path:
    """Writes an importable distribution with `meliad` entry points into `root`; returns `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for module, source in (modules or {}).items():
        (root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    for package, source_dir in (packages or {}).items():
        shutil.copytree(source_dir, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
    lines = ["[meliad]"] + [f"{ep} = {target}" for ep, target in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    importlib.invalidate_caches()
    return root


def example_project() -> dict:
    """What the example plugin's own pyproject.toml declares."""
    return tomllib.loads((THIRD_PARTY / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def install_example(root: Path) -> Path:
    """tests/third_party_plugin as if pip-installed into `root`."""
    project = example_project()
    return make_distribution(root, project["name"], project["version"], project["entry-points"]["meliad"],
                             packages={"meliad_example_memory": THIRD_PARTY / "meliad_example_memory"})


BROKEN_IMPORT = {"meliad_broken_import": 'raise ImportError("broken on purpose at import")\n'}
