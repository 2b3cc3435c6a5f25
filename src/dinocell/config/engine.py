"""The one config engine: typed dataclass defaults -> YAML -> ``key=value`` overrides, merged strictly.

Every command's schema (``pretrain``'s :class:`~dinocell.config.schema.Config`, ``segment``'s,
``extract-volumes``' and ``embed``'s options) goes through :func:`load`, so all of them share the same
rules: an unknown key fails with its dotted name and the closest valid key (a typo that silently falls
back to a default can waste a 40-hour run), values are coerced to the annotated type or fail naming the
key, and every section's ``validate()`` runs once the tree is merged (sections first, then the root).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from dinocell.errors import ConfigError

T = TypeVar("T")


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass tree (leaves and sections)."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        keys.append(dotted)
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys.extend(all_keys(t, dotted + "."))  # type: ignore[arg-type]
    return keys


def unknown_key(dotted: str, root: type) -> ConfigError:
    """``unknown config key 'x.y' (did you mean 'x.z'?)``: the closest dotted key, else the same leaf name."""
    keys = all_keys(root)
    close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.5)
    if not close:  # fall back to matching the last component only
        leaf = dotted.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{dotted}'{hint}")


def coerce(value: Any, tp: Any, dotted: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; fail with the key's name."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, dotted)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{dotted}' cannot be {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):  # allow "a,b,c" on the command line
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{dotted}' expects a list, got {value!r}")
        inner = args[0] if args else Any
        return [coerce(v, inner, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{dotted}' expects a mapping, got {value!r}")
        kt, vt = args if len(args) == 2 else (str, Any)
        # string-valued maps (data.s3.filters) keep their values as given: a filter may be a list or a number
        return {coerce(k, kt, f"{dotted}.{k}"): v if vt in (str, Any) else coerce(v, vt, f"{dotted}.{k}")
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{dotted}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{dotted}' expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"config key '{dotted}' expects an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{dotted}' expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{dotted}' expects a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{dotted}' expects a string, got {value!r}")
        if isinstance(value, bool):  # YAML 1.1 reads a bare `off` / `on` as a boolean (data.illum=off)
            return "on" if value else "off"
        return str(value)
    return value


def merge(obj: Any, data: Mapping[str, Any], prefix: str = "", root: type | None = None) -> None:
    """Merge a nested mapping into dataclass instance ``obj`` in place, strictly (``root``: the tree
    whose keys an unknown key is compared with; default ``type(obj)``)."""
    root = root or type(obj)
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise unknown_key(dotted, root)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            merge(current, value if value is not None else {}, dotted + ".", root)
        else:
            setattr(obj, key, coerce(value, hints[key], dotted))


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, the YAML value; the raw text when it is not valid YAML)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def nest(dotted: str, value: Any) -> dict[str, Any]:
    """``("a.b.c", v)`` -> ``{"a": {"b": {"c": v}}}``."""
    out: dict[str, Any] = {}
    cur = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return out


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an experiment YAML file into a mapping (one-line errors for missing/invalid files)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def _drop_retired(data: Mapping[str, Any], retired: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` without the dotted ``retired`` keys: keys older versions wrote into run
    configs (run outputs such as ``data.holdout.n_wells``), so their config.yaml files still load."""
    out = copy.deepcopy(dict(data))
    for dotted in retired:
        *path, leaf = dotted.split(".")
        node: Any = out
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def validate(cfg: Any) -> None:
    """Run every section's ``validate()`` (innermost first), then the root's: the one place a schema's
    cross-field rules live."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate(value)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()


def load(schema: type[T] | T, path: str | os.PathLike[str] | None = None,
         overrides: Sequence[str] = (), *, data: Mapping[str, Any] | None = None) -> T:
    """The schema's defaults (or a given instance, changed in place), then the YAML file at ``path``,
    then the mapping ``data``, then ``key=value`` ``overrides``; strict, and validated once."""
    cfg: Any = schema() if isinstance(schema, type) else schema
    root = type(cfg)
    retired = tuple(getattr(root, "retired_keys", ()))
    for layer in ((load_yaml(path) if path is not None else None), data):
        if layer is not None:
            merge(cfg, _drop_retired(layer, retired) if retired else layer, root=root)
    for item in overrides:
        key, value = parse_override(item)
        if key not in retired:
            merge(cfg, nest(key, value), root=root)
    validate(cfg)
    return typing.cast(T, cfg)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config tree as plain Python data (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


def check_choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    """``config key 'x' must be one of a, b; got 'c'`` unless ``value`` is allowed."""
    if value not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, allowed))}; got '{value}'")
