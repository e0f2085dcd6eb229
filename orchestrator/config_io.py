"""YAML in, `--set a.b=c` overrides on top; every error names the file and the dotted key.

`core.config` stays stdlib-only; this module is the one place that reads YAML. Override values are
parsed as YAML scalars (YAML 1.2 floats), so `--set algorithm.kl_coef=1e-2` is a float, `run.seed=3` an int,
`algorithm.kl_importance_correction=true` a bool and `task.data_path=data/x.jsonl` a string.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from core.config import Config, ConfigError, set_dotted


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, plus YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-3` as a *string*."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def safe_load(text: str):
    """yaml.safe_load with YAML 1.2 float syntax (`1e-3` is 0.001)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


class SpecError(ConfigError):
    """A config or study file (or an override) is invalid; the message starts with 'file: key: ...'."""


def load_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping (an empty file is {}); errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SpecError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', yaml-scalar(c)); the value may contain '='."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError(f"--set {text!r}: expected KEY=VALUE, e.g. --set algorithm.kl_coef=0.01")
    try:
        value = safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML (e.g. 'a: b: c'): keep the text as typed
    return key, value


def apply_overrides(data: dict, overrides: Iterable[str], source: str = "--set") -> dict:
    """A deep copy of data with each 'a.b=c' applied; unknown keys surface in Config validation."""
    data = copy.deepcopy(data)
    for text in overrides:
        key, value = parse_override(text)
        try:
            set_dotted(data, key, value)
        except ConfigError as exc:
            raise SpecError(f"{source}: {exc}") from None
    return data


def config_from_dict(data: dict, source: str) -> Config:
    """Validate a nested dict into a Config; a failure is re-raised as 'source: field: message'."""
    try:
        return Config.from_dict(data)
    except ConfigError as exc:
        raise SpecError(f"{source}: {exc}") from None


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """A single trial's Config from a YAML file with optional `a.b=c` overrides."""
    data = apply_overrides(load_yaml(path), overrides, source=f"{path} (--set)")
    return config_from_dict(data, str(path))


def dump_yaml(data: dict, path: str | Path) -> Path:
    """Write a plain nested dict as readable YAML (keys in definition order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
