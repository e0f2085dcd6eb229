"""YAML in, `--set a.b=c` overrides on top; every error names the file and the dotted key.

`core.config` stays stdlib-only; this module is the one place that reads YAML. Override values are
parsed as YAML scalars (YAML 1.2 floats), so `--set algorithm.kl_coef=1e-2` is a float, `run.seed=3` an int,
`algorithm.kl_importance_correction=true` a bool and `task.data_path=data/x.jsonl` a string.
"""
from __future__ import annotations

import copy
import math
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


def safe_load(text: str, source: str = "<string>", root: str = ""):
    """yaml.safe_load with YAML 1.2 float syntax (`1e-3` is 0.001) that refuses what PyYAML lets through.

    A duplicate key anywhere (PyYAML keeps the last one silently: `run.seed: [0, 1]` then
    `run.seed: [2, 3]` would run only the second) and a non-finite number anywhere (`.inf`, `.nan`: no
    klrl setting means anything at infinity, and NaN passes every `<`/`>=` range check) raise SpecError
    '<source>: <dotted path>: ...' with the line numbers (`root` prefixes the path of a `--set` value, which
    has no lines worth naming). yaml.YAMLError is raised for malformed YAML.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_node(node, root, source, set(), lines=not root)
        return loader.construct_document(node)
    finally:
        loader.dispose()


_FLOAT_TAG, _MERGE_TAG = "tag:yaml.org,2002:float", "tag:yaml.org,2002:merge"


def _where(mark, other=None) -> str:
    """'at line 7', or 'at line 7, column 12' when two places share a line (a flow mapping)."""
    if other is not None and other.line == mark.line:
        return f"at line {mark.line + 1}, column {mark.column + 1}"
    return f"at line {mark.line + 1}"


def _finite(text: str) -> bool:
    """Whether a YAML float scalar is finite: '.inf', '-.Inf', '.nan' and overflowing '1e400' are not."""
    value = text.replace("_", "").lower()
    if value.lstrip("+-") in (".inf", ".nan"):
        return False
    try:
        return math.isfinite(float(value))
    except ValueError:  # YAML 1.1 sexagesimal ('1:30.5'): always finite
        return True


def _check_node(node: yaml.Node, path: str, source: str, seen: set[int], lines: bool = True) -> None:
    """Walk a composed YAML node tree: duplicate keys and non-finite floats raise SpecError naming the path."""
    if isinstance(node, yaml.ScalarNode):
        if node.tag == _FLOAT_TAG and not _finite(node.value):
            where = f" ({_where(node.start_mark)})" if lines else ""
            raise SpecError(f"{source}: {path or 'value'}: {node.value!r} is not a finite number{where}; every "
                            "number klrl reads must be finite")
        return
    if id(node) in seen:  # an alias of a node already checked (or a recursive anchor)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_node(item, f"{path}[{i}]", source, seen, lines)
        return
    first: dict[tuple[str, str], yaml.Node] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:  # `<<: *defaults` merges on purpose; its keys may be overridden
            _check_node(value_node, path, source, seen, lines)
            continue
        name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "<key>"
        dotted = f"{path}.{name}" if path else str(name)
        key = (key_node.tag, name)
        if key in first:
            before = first[key].start_mark
            where = f" {_where(key_node.start_mark, before)} (first {_where(before, key_node.start_mark)})" \
                if lines else ""
            raise SpecError(f"{source}: {dotted}: duplicate key{where}; YAML would silently keep only the last "
                            "one: remove one")
        first[key] = key_node
        _check_node(value_node, dotted, source, seen, lines)


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
        data = safe_load(text, source=str(path))
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
    """'a.b=c' -> ('a.b', yaml-scalar(c)); the value may contain '='. Errors start with '--set a.b=c: '."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError(f"--set {text!r}: expected KEY=VALUE, e.g. --set algorithm.kl_coef=0.01")
    try:
        value = safe_load(raw, source=f"--set {text}", root=key) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML (e.g. 'a: b: c'): keep the text as typed
    return key, value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """A deep copy of data with each 'a.b=c' applied; unknown keys surface in Config validation."""
    data = copy.deepcopy(data)
    for text in overrides:
        key, value = parse_override(text)
        try:
            set_dotted(data, key, value)
        except ConfigError as exc:
            raise SpecError(f"--set {text}: {exc}") from None
    return data


def config_from_dict(data: dict, source: str) -> Config:
    """Validate a nested dict into a Config; a failure is re-raised as 'source: field: message'."""
    try:
        return Config.from_dict(data)
    except ConfigError as exc:
        raise SpecError(f"{source}: {exc}") from None


def set_source(overrides: Iterable[str], field: str | None = None) -> str:
    """How an error caused by `--set` names it: the override of `field` if there is one, else all of them."""
    overrides = list(overrides)
    named = [text for text in overrides if text.partition("=")[0].strip() == field]
    return " ".join(f"--set {text}" for text in (named or overrides))


def error_field(exc: Exception) -> str:
    """The dotted field a ConfigError names first ('algorithm.kl_coef: must be ...' -> 'algorithm.kl_coef')."""
    return str(exc).split(":", 1)[0].strip()


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """A single trial's Config from a YAML file with optional `a.b=c` overrides.

    The file is validated on its own first, so an error names the file only when the file is at fault and
    `--set KEY=VALUE` when an override is.
    """
    data = load_yaml(path)
    config = config_from_dict(data, str(path))
    overrides = list(overrides)
    if not overrides:
        return config
    try:
        return Config.from_dict(apply_overrides(data, overrides))
    except SpecError:
        raise
    except ConfigError as exc:
        raise SpecError(f"{set_source(overrides, error_field(exc))}: {exc}") from None


def dump_yaml(data: dict, path: str | Path) -> Path:
    """Write a plain nested dict as readable YAML (keys in definition order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
