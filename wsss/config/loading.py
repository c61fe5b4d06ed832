"""Loading: a YAML file and ``group.key=value`` overrides become one validated Config; and
``describe_keys``, every key as ``wsss show-config --keys`` lists it."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from wsss.config.checks import check_config
from wsss.config.coercion import closest, coerce, describe_type
from wsss.config.fields import ConfigError
from wsss.config.schema import Config

RENAMED = {"pseudo.crf": "pseudo.crf was replaced by pseudo.refine=crf (or par / affinity / none)"}


def _build_group(cls: type, values: dict[str, Any], group: str) -> Any:
    """One group's dataclass from its keys: unknown keys refused, values coerced, choices checked."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    for key in unknown:
        if f"{group}.{key}" in RENAMED:
            raise ConfigError(RENAMED[f"{group}.{key}"])
    if unknown:
        raise ConfigError(
            f"unknown key {group}.{unknown[0]}{closest(unknown[0], fields)}; valid keys in "
            f"'{group}': {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{group}.{name}"
        coerced = coerce(value, hints[name], key)
        choices = fields[name].metadata.get("choices")
        if choices and coerced not in choices:
            raise ConfigError(
                f"{key}: {coerced!r} is not a valid choice{closest(coerced, choices)}; "
                f"choose one of: {', '.join(map(str, choices))}"
            )
        kwargs[name] = coerced
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (unknown keys and bad values raise)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of groups, got {type(raw).__name__}")
    groups = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - set(groups))
    if unknown:
        raise ConfigError(
            f"unknown config group '{unknown[0]}'{closest(unknown[0], groups)}; valid groups: "
            f"{', '.join(groups)}"
        )
    hints = typing.get_type_hints(Config)
    built = {}
    for name in groups:
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
        built[name] = _build_group(hints[name], values, name)
    cfg = Config(**built)
    check_config(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``group.key=value`` into its path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. data.batch_size=8")
    key, _, raw_value = text.partition("=")
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"override {text!r}: keys have the form group.key, e.g. run.name=exp1")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    return path, value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``group.key=value`` overrides and validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a mapping of groups")
    for text in overrides:
        (group, key), value = parse_override(text)
        section = raw.setdefault(group, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{group}: expected a mapping of keys")
        section[key] = value
    return config_from_dict(raw)


def describe_keys() -> str:
    """Every key with its type, default and choices, for `wsss show-config --keys`."""
    lines = []
    hints = typing.get_type_hints(Config)
    for group in dataclasses.fields(Config):
        cls = hints[group.name]
        group_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            extra = f" choices: {', '.join(map(str, choices))}" if choices else ""
            lines.append(
                f"{group.name}.{f.name} ({describe_type(group_hints[f.name])}, default {default!r})"
                f"{extra}  {f.metadata.get('help', '')}"
            )
    return "\n".join(lines)
