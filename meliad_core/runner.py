"""Runs a validated recipe: training, evaluation, checkpoints (being written)."""

from __future__ import annotations

from pathlib import Path

from meliad_core.config import Recipe


class NotBuiltYet(RuntimeError):
    """A part of meliad that does not exist yet; the message says which."""


def run_training(recipe: Recipe, workdir: Path, load_dir: Path | None = None) -> None:
    raise NotBuiltYet("meliad run: training is not built yet (the recipe is valid)")
