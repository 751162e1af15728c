"""Reading `data.options` values, with one-line `RecipeError`s naming the key."""

from __future__ import annotations

from meliad_core.config import RecipeError


def _key(name: str) -> str:
    return f"data.options.{name}"


def get_int(options: dict, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RecipeError(f"{_key(name)}: got {value!r}, expected an integer >= {minimum}")
    if maximum is not None and value > maximum:
        raise RecipeError(f"{_key(name)}: got {value!r}, expected at most {maximum}")
    return value


def get_float(options: dict, name: str, default: float, low: float, high: float) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RecipeError(f"{_key(name)}: got {value!r}, expected a number in [{low}, {high}]")
    return float(value)


def get_bool(options: dict, name: str, default: bool) -> bool:
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise RecipeError(f"{_key(name)}: got {value!r}, expected true or false")
    return value


def get_str(options: dict, name: str, default: str | None, required: bool = False, what: str = "a string"):
    value = options.get(name, default)
    if value is None:
        if required:
            raise RecipeError(f"{_key(name)}: missing; expected {what}")
        return None
    if not isinstance(value, str) or (required and not value):
        raise RecipeError(f"{_key(name)}: got {value!r}, expected {what}")
    return value


def get_str_list(options: dict, name: str, required: bool = False, what: str = "a string or a list of strings"):
    value = options.get(name)
    if value is None:
        if required:
            raise RecipeError(f"{_key(name)}: missing; expected {what}")
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise RecipeError(f"{_key(name)}: got {value!r}, expected {what}")
    return list(value)
