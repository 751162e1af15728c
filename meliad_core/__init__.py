"""meliad_core: the skeleton of meliad (layers, model, plugin manager, recipes, data, training).

Importing this package does not import Keras, so the CLI can set KERAS_BACKEND first. The names
below that need Keras are loaded on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "build_model": ("meliad_core.model", "build_model"),
    "MeliadLM": ("meliad_core.model", "MeliadLM"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'meliad_core' has no attribute {name!r}")
