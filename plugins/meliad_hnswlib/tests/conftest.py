"""meliad-hnswlib's tests: skipped as a whole when hnswlib is not installed.

The distribution is put on sys.path "as installed" (its package plus a dist-info with its entry
point, read from its own pyproject.toml), so the tests need no pip install; meliad's own test helpers
(`StoreDriver`, `check_round_trip`, ...) come from meliad's tests folder.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("hnswlib", reason="hnswlib is not installed (pip install hnswlib==0.8.0)")

HERE = Path(__file__).resolve().parent
DIST = HERE.parent
MELIAD_TESTS = DIST.parent.parent / "tests"


@pytest.fixture(scope="session", autouse=True)
def hnsw_installed(tmp_path_factory):
    project = tomllib.loads((DIST / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    root = tmp_path_factory.mktemp("dist")
    info = root / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    lines = ["[meliad]"] + [f"{k} = {v}" for k, v in project["entry-points"]["meliad"].items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    sys.path[:0] = [str(root), str(DIST), str(MELIAD_TESTS)]
    import importlib

    importlib.invalidate_caches()
    from meliad_core import plugins

    plugins.set_plugin_manager(None)
    yield root
    plugins.set_plugin_manager(None)


@pytest.fixture
def installed_plugins():
    yield
