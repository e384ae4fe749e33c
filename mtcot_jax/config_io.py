"""YAML in and out of a `Config` (`config.py`): presets and their `base`, override
text, and each YAML value converted to its field's type. Knows the sections by
name only (`sections`), so that it imports nothing from the package but errors."""

from __future__ import annotations

import os
import typing
from typing import Any, Iterable

import yaml

from mtcot_jax.errors import ConfigError


def yaml_plain(value):
  """Tuples to lists, recursively, for writing YAML."""
  if isinstance(value, tuple):
    return [yaml_plain(v) for v in value]
  return value


def coerce(key: str, value: Any, tp: Any) -> Any:
  """Converts a YAML value to the annotated type, or raises ConfigError."""
  origin = typing.get_origin(tp)
  if tp is bool:
    if isinstance(value, bool):
      return value
    raise ConfigError(f"{key}={value!r}: expected a bool (true or false)")
  if tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise ConfigError(f"{key}={value!r}: expected an int")
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):  # PyYAML reads '3e-3' (no dot) as a string
      try:
        return float(value)
      except ValueError:
        pass
    raise ConfigError(f"{key}={value!r}: expected a number")
  if tp is str:
    if isinstance(value, str):
      return value
    raise ConfigError(f"{key}={value!r}: expected a string")
  if tp is Any:
    return _freeze(value)
  if origin is tuple:
    args = typing.get_args(tp)
    if args and (args[0] is tuple or typing.get_origin(args[0]) is tuple):
      # A mapping stored as sorted (key, value) pairs: accept a dict too.
      if isinstance(value, dict):
        value = list(value.items()) if key.endswith("rules") else sorted(value.items())
    if isinstance(value, int) and not isinstance(value, bool) and args[:1] == (int,):
      value = [value]
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}={value!r}: expected a list")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if len(args) != len(value):
      raise ConfigError(f"{key}={value!r}: expected {len(args)} items")
    return tuple(coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
  raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _freeze(value):
  if isinstance(value, list):
    return tuple(_freeze(v) for v in value)
  if isinstance(value, dict):
    return tuple((k, _freeze(v)) for k, v in value.items())
  return value


def read_preset(path: str, sections: Iterable[str],
                seen: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
  """Reads a preset and the presets it inherits from, merged by section."""
  path = os.path.abspath(path)
  if path in seen:
    raise ConfigError(f"preset {path} inherits from itself (through {list(seen)})")
  if not os.path.exists(path):
    raise ConfigError(f"config file {path} does not exist")
  with open(path) as f:
    try:
      raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
      where = getattr(e, "problem_mark", None)
      at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
      raise ConfigError(f"config file {path} is not valid YAML{at}: "
                        f"{getattr(e, 'problem', None) or e}; accepted: a YAML mapping of "
                        "sections (model, head, data, train, rl, decode, mesh) and 'base'") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"config file {path}: expected a mapping of sections, got {raw!r}")
  merged: dict[str, dict[str, Any]] = {}
  base = raw.pop("base", None)
  if base is not None:
    merged = read_preset(os.path.join(os.path.dirname(path), base), sections, seen + (path,))
  for section, values in raw.items():
    if section not in sections:
      raise ConfigError(f"{path}: unknown config section {section!r}; accepted: "
                        f"{sorted(sections)} and 'base'")
    if not isinstance(values, dict):
      raise ConfigError(f"{path}: section {section} must be a mapping, got {values!r}")
    merged.setdefault(section, {}).update(values)
  return merged


def parse_override(text: str, sections: Iterable[str]) -> tuple[str, str, Any]:
  """'section.key=value' -> (section, key, YAML-parsed value)."""
  if "=" not in text or "." not in text.split("=", 1)[0]:
    raise ConfigError(f"override {text!r}: expected section.key=value, e.g. head.k=3")
  lhs, rhs = text.split("=", 1)
  section, key = lhs.strip().split(".", 1)
  if section not in sections:
    raise ConfigError(f"override {text!r}: unknown section {section!r}; accepted: {sorted(sections)}")
  try:
    value = yaml.safe_load(rhs) if rhs.strip() else ""
  except yaml.YAMLError as e:
    raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
  return section, key.strip(), value
