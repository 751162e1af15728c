"""Options that plugins declare for themselves, validated like core recipe keys.

A plugin registers `options={"nprobe": Option(int, 8, "cells probed per query", minimum=1)}`; the
recipe sets them under the section's `options` mapping (`memory.options.nprobe: 16`). Unknown keys,
wrong types and out-of-range values stop with one line naming the dotted key, as core keys do.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from meliad_core.config import RecipeError

_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               list: "a list", dict: "a mapping"}


@dataclass(frozen=True)
class Option:
    """One declared option: its type (int, float, bool, str, list or dict), default and limits."""

    type: type
    default: Any = None
    description: str = ""
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None

    def expected(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        word = _TYPE_WORDS.get(self.type, self.type.__name__)
        if self.minimum is not None and self.maximum is not None:
            return f"{word} in [{self.minimum}, {self.maximum}]"
        if self.minimum is not None:
            return f"{word} >= {self.minimum}"
        if self.maximum is not None:
            return f"{word} <= {self.maximum}"
        return word

    def convert(self, value: Any, key: str) -> Any:
        """The value checked (and an int widened to float where a number is declared), or RecipeError."""
        ok_type = {
            bool: isinstance(value, bool),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float)) and not isinstance(value, bool),
            str: isinstance(value, str),
            list: isinstance(value, (list, tuple)),
            dict: isinstance(value, dict),
        }.get(self.type, isinstance(value, self.type))
        if value is None and self.default is None:
            return None
        if not ok_type:
            raise RecipeError(f"{key}: got {value!r}, expected {self.expected()}")
        if self.type is float:
            value = float(value)
        if self.type is list:
            value = list(value)
        if self.choices and value not in self.choices:
            raise RecipeError(f"{key}: got {value!r}, expected {self.expected()}")
        if self.minimum is not None and value < self.minimum or self.maximum is not None and value > self.maximum:
            raise RecipeError(f"{key}: got {value!r}, expected {self.expected()}")
        return value


def validate_options(declared: dict[str, Option] | None, given: dict | None, prefix: str, owner: str) -> dict:
    """The options a plugin will receive: `given` checked against `declared`, defaults filled in.

    `prefix` is the recipe key that holds them (e.g. "memory.options"); `owner` names the plugin
    (e.g. "memory store 'faiss'") in the error for an option it does not declare.
    """
    declared = declared or {}
    given = dict(given or {})
    for key in given:
        if key not in declared:
            close = difflib.get_close_matches(str(key), list(declared), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}.{close[0]}'?" if close else ""
            known = ", ".join(declared) or "none"
            raise RecipeError(f"{prefix}.{key}: unknown option of {owner}{hint} (its options: {known})")
    return {name: option.convert(given[name], f"{prefix}.{name}") if name in given else option.default
            for name, option in declared.items()}
