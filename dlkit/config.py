"""Dataclass configs: overrides from the shell (``--set key=value``) and round trips via JSON."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from dlkit.errors import UsageError


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_scalar(text: str, tp: Any, key: str) -> Any:
    if tp is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{key}={text!r} is not a boolean", hint="use true or false")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise UsageError(f"{key}={text!r} is not a{'n' if tp is int else ''} {tp.__name__}") from None
    if tp is str:
        return text
    raise UsageError(f"{key} cannot be set from the shell")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a string from the shell, or a JSON value) to the annotated type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
        if len(non_none) == 1:
            return coerce(value, non_none[0], key)
        raise UsageError(f"{key} has an ambiguous type")
    if origin is tuple:
        elem = args[0] if args else str
        if isinstance(value, str):
            items = [v for v in value.replace(" ", "").split(",") if v != ""]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        return tuple(coerce(v, elem, key) for v in items)
    if isinstance(value, str):
        return _parse_scalar(value, tp, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise UsageError(f"{key}={value!r} should be a {tp.__name__}")
    return value


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """``["hidden=256", "dropout=0.1"]`` -> ``{"hidden": "256", "dropout": "0.1"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r} is not key=value", hint="e.g. --set hidden=256")
        out[key.strip()] = value.strip()
    return out


def apply_overrides(cfg: Any, overrides: dict[str, Any], what: str = "config") -> Any:
    """A copy of dataclass ``cfg`` with ``overrides`` applied; unknown keys are an error."""
    hints = _field_types(type(cfg))
    fields = [f.name for f in dataclasses.fields(cfg)]
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise UsageError(
            f"unknown {what} key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
            hint="valid keys: " + ", ".join(fields),
        )
    values = {k: coerce(v, hints[k], k) for k, v in overrides.items()}
    return dataclasses.replace(cfg, **values)


def to_dict(cfg: Any) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def from_dict(cls: type, d: dict) -> Any:
    """Rebuild a config from JSON, coercing lists back to tuples; unknown keys are an error."""
    return apply_overrides(cls(), dict(d), what=f"{cls.__name__}")
