"""Coercion: a value from YAML or an override turned into its key's annotated type, or a
ConfigError that names the key, the type expected and the value given."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Union

from wsss.config.fields import ConfigError


def describe_type(tp: Any) -> str:
    """A type annotation as users read it: "list of float", "int or null", ..."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {describe_type(typing.get_args(tp)[0])}"
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        return f"mapping of {describe_type(key_tp)} to {describe_type(value_tp)}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return coerce(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        if value is not None and len(options) == 1 and typing.get_origin(options[0]) is dict:
            raise errors[
                typing.get_args(tp).index(options[0])
            ]  # Optional[mapping]: its own, precise message
        raise ConfigError(f"{key}: expected {describe_type(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {describe_type(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        return coerce_mapping(value, tp, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def closest(value: Any, choices: Any) -> str:
    """' (did you mean X?)' for the choice closest to a misspelt value, or ''."""
    match = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def coerce_mapping(value: Any, tp: Any, key: str) -> dict[Any, Any]:
    """A mapping with typed keys and values; integer keys may also be written as quoted digits."""
    key_tp, value_tp = typing.get_args(tp)
    example = " such as {0: 0, 255: 1} (a space after each colon)" if key_tp is int else ""
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a {describe_type(tp)}{example}, got {value!r}")
    result = {}
    for raw_key, item in value.items():
        if key_tp is int and isinstance(raw_key, str) and raw_key.strip().lstrip("-").isdigit():
            raw_key = int(raw_key)
        try:
            coerced_key = coerce(raw_key, key_tp, f"{key} key {raw_key!r}")
            result[coerced_key] = coerce(item, value_tp, f"{key}[{raw_key!r}]")
        except ConfigError as exc:
            raise ConfigError(f"{exc}; {key} is a {describe_type(tp)}{example}") from exc
    return result
