"""Typed dataclasses from plain mappings (YAML/JSON), with errors that name the field.

The machinery under `moelab.config`: `build` makes a dataclass from a mapping, checking every key
(an unknown key names the closest valid one) and coercing every value to the field's annotated
type; the `check_*` helpers are the validators the config parts call from `validate()`. Every
failure raises `ConfigError` with the dotted path of the field, the value and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from moelab.errors import ConfigError


def read_mapping(path: Path) -> dict:
    """A YAML or JSON config file's top-level mapping."""
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    try:
        text = path.read_text()
        d = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path}: cannot parse ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return d


def build(cls, d: Any, path: str):
    """Build dataclass `cls` from a mapping, checking keys and types."""
    where = path or "config"
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__} {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown key '{full}'{hint} (valid keys of {where}: {', '.join(fields)})"
            )
        kwargs[key] = coerce(hints[key], value, full)
    return cls(**kwargs)


def coerce(tp, value, path: str):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return coerce(args[0], value, path)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()
        ):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return copy.deepcopy(value)


def set_dotted(d: dict, key: str, value) -> None:
    parts = key.split(".")
    cur = d
    for i, part in enumerate(parts[:-1]):
        if not isinstance(cur, dict) or part not in cur:
            valid = ", ".join(cur) if isinstance(cur, dict) else ""
            close = difflib.get_close_matches(part, list(cur) if isinstance(cur, dict) else [], n=1)
            hint = f"; did you mean '{'.'.join(parts[:i] + [close[0]])}'?" if close else ""
            raise ConfigError(f"--set {key}: unknown key '{'.'.join(parts[:i + 1])}'{hint} "
                              f"(valid: {valid})")
        cur = cur[part]
    if not isinstance(cur, dict):
        raise ConfigError(f"--set {key}: '{'.'.join(parts[:-1])}' is not a section")
    cur[parts[-1]] = value  # unknown leaf keys are reported by build() with a suggestion


def check_choice(path: str, value, allowed) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}: {value!r} is not allowed{hint}; allowed: {', '.join(allowed)}")


def check_kind(path: str, value: str, registry_name: str) -> None:
    import moelab.registry as reg

    registry = getattr(reg, registry_name)
    if value not in registry:
        check_choice(path, value, registry.names())


def check_positive(path: str, value) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{path}: {value!r} must be a positive number")


def check_non_negative(path: str, value) -> None:
    if value is None or value < 0:
        raise ConfigError(f"{path}: {value!r} must be >= 0")


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]
