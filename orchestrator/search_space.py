"""Study files: a base config, grid axes and an optional Optuna search, validated before anything runs.

A study file (search_spaces/*.yaml):

    name: miniature                       # MLflow experiment and run-directory name
    base: {model: {path: tiny}, ...}      # nested; maps one to one onto core.config.Config
    grid:                                 # the cartesian product of all axes is the set of trials
      arms:                               # a *bundle* axis (no dot in its name): each value sets
        - {algorithm.kl_mode: none}       #   several dotted fields at once; optional `name:` labels it
        - {algorithm.kl_mode: in_reward, algorithm.kl_estimator: k1}
        - {algorithm.kl_mode: in_loss, algorithm.kl_estimator: k3}
      run.seed: [0, 1]                    # a *field* axis (a dotted field): each value sets that field
    optuna:                               # optional: Optuna samples these on top of the grid axes
      metric: reward/mean
      mode: max
      num_samples: 8
      params: {algorithm.kl_coef: {loguniform: [1.0e-3, 1.0e-1]}}
    tune: {max_failures: 1, max_concurrent_trials: 2}

Bundles keep the seed study's arms as one axis, so kl_mode and kl_estimator can never be crossed into
combinations nobody asked for. Every trial config (and both ends of every Optuna range) is validated
through `Config.from_dict` at load; errors read 'file: key: message'.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from core.config import Config, ConfigError, advisories, field_names, set_dotted
from orchestrator.config_io import SpecError, apply_overrides, config_from_dict, error_field, load_yaml, set_source
from orchestrator.tracking import unsupported_uri

TOP_KEYS = ("name", "description", "base", "grid", "optuna", "tune")
TUNE_KEYS = ("max_failures", "max_concurrent_trials", "num_samples")
OPTUNA_KEYS = ("metric", "mode", "num_samples", "params", "seed")
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
FIELDS = frozenset(field_names(Config))


@dataclass(frozen=True)
class Axis:
    """One grid axis: labelled bundles of dotted-field overrides (a field axis has one field each)."""

    name: str
    labels: tuple[str, ...]
    bundles: tuple[dict, ...]

    def bundle(self, label: str) -> dict:
        return self.bundles[self.labels.index(label)]


@dataclass(frozen=True)
class Study:
    """A validated study: what `klrl run` turns into Tune trials."""

    name: str
    path: str
    base: dict  # nested dict, --set overrides applied
    axes: tuple[Axis, ...]
    optuna: dict | None = None  # {"metric", "mode", "num_samples", "params": {dotted: {dist: args}}}
    tune: dict = field(default_factory=dict)
    description: str = ""
    overrides: tuple[str, ...] = ()  # the `--set KEY=VALUE`s applied to base
    file_base: dict | None = None  # base as the file has it, when overrides changed it
    warnings: tuple[str, ...] = ()  # legal but questionable settings, 'where: field: message'

    # ---- what a trial sees --------------------------------------------------------------------
    def trial_overrides(self, labels: dict[str, str], sampled: dict[str, Any] | None = None) -> dict:
        """The dotted-field overrides one trial applies on top of the base."""
        out: dict[str, Any] = {}
        for axis in self.axes:
            out.update(axis.bundle(labels[axis.name]))
        out.update(sampled or {})
        return out

    def trial_config(self, labels: dict[str, str], sampled: dict[str, Any] | None = None) -> Config:
        data = _merged(self.base, self.trial_overrides(labels, sampled))
        return config_from_dict(data, self.path)

    def grid(self) -> list[dict[str, str]]:
        """Every grid point as {axis name: label}, in file order."""
        names = [a.name for a in self.axes]
        return [dict(zip(names, combo)) for combo in itertools.product(*(a.labels for a in self.axes))]

    def num_trials(self) -> int:
        return self.optuna["num_samples"] if self.optuna else len(self.grid()) * self.tune.get("num_samples", 1)

    def trial_name(self, labels: dict[str, str]) -> str:
        return " ".join(labels[a.name] for a in self.axes) or self.name

    def points(self) -> list[tuple[dict[str, str], dict[str, Any]]]:
        """(grid labels, Optuna sample) pairs covering every trial config: each grid point with each
        Optuna range end (one param varied at a time), or alone without Optuna."""
        return [(labels, sampled) for labels in self.grid() for sampled in _extremes(self.optuna)]

    def locate(self, labels: dict[str, str], sampled: dict, bad_field: str) -> str:
        """Where in the file a trial's bad value comes from: an Optuna range end, a grid value, or the point."""
        return _culprit(self, labels, sampled, bad_field)

    def setter_of(self, key: str) -> str | None:
        """The grid axis or Optuna param that sets field `key` in trials ('grid.run.seed'), if any."""
        return _setter_of(self, key)

    def from_file_only(self) -> "Study":
        """This study without its `--set` overrides (to tell whether the file or an override is at fault)."""
        if not self.overrides:
            return self
        return dataclasses.replace(self, base=self.file_base, overrides=(), file_base=None)

    # ---- what Tune sees ------------------------------------------------------------------------
    def param_space(self) -> dict:
        """Tune's param_space: {'grid': {axis: label}, 'search': {dotted: distribution}}."""
        from ray import tune

        if not self.optuna:
            return {"grid": {a.name: tune.grid_search(list(a.labels)) for a in self.axes}}
        # Optuna samples categorical labels for the grid axes (it cannot run a grid itself).
        return {
            "grid": {a.name: tune.choice(list(a.labels)) for a in self.axes},
            "search": {key: _distribution(spec) for key, spec in self.optuna["params"].items()},
        }

    def tune_config(self):
        from ray import tune

        kwargs = {"max_concurrent_trials": self.tune.get("max_concurrent_trials")}
        if not self.optuna:
            return tune.TuneConfig(num_samples=self.tune.get("num_samples", 1), **kwargs)
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(metric=self.optuna["metric"], mode=self.optuna["mode"], seed=self.optuna.get("seed"))
        return tune.TuneConfig(search_alg=searcher, num_samples=self.optuna["num_samples"],
                               metric=self.optuna["metric"], mode=self.optuna["mode"], **kwargs)


def load_study(path: str | Path, overrides: Iterable[str] = ()) -> Study:
    """Read and validate a study file; raises SpecError('file: key: ...') before anything runs."""
    path = str(path)
    raw = load_yaml(path)
    return parse_study(raw, path, overrides)


def parse_study(raw: dict, path: str, overrides: Iterable[str] = ()) -> Study:
    """Validate the file on its own (errors name the file), then the `--set` overrides (errors name them)."""
    def fail(key: str, message: str):
        raise SpecError(f"{path}: {key}: {message}")

    for key in raw:
        if key not in TOP_KEYS:
            fail(key, f"unknown key; allowed: {list(TOP_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name:
        fail("name", "required: a non-empty study name without '/'")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        fail("base", f"expected a mapping, got {type(base).__name__}")
    config_from_dict(base, f"{path}: base")
    if _tracking_uri_problem(base):
        fail("base", _tracking_uri_problem(base))
    axes = tuple(_parse_axis(axis_name, values, fail) for axis_name, values in _grid(raw, fail).items())
    optuna = _parse_optuna(raw.get("optuna"), fail) if raw.get("optuna") is not None else None
    study = Study(name=name, path=path, base=base, axes=axes, optuna=optuna, tune=_parse_tune(raw, fail),
                  description=str(raw.get("description", "")))
    _check_one_setter_per_field(study, fail)
    _validate_trials(study, fail)
    overrides = list(overrides)
    if overrides:
        study = _with_overrides(study, overrides)
    return dataclasses.replace(study, warnings=_warnings(study))


def _with_overrides(study: Study, overrides: list[str]) -> Study:
    """The study with `--set` applied to its base; the file is valid, so every error here names `--set`."""
    def fail(where: str | None, message: str):  # message: 'field: why'
        raise SpecError(f"{set_source(overrides, error_field(message))}: {where + ': ' if where else ''}{message}")

    base = apply_overrides(study.base, overrides)
    for text in overrides:
        key = text.partition("=")[0].strip()
        if _setter_of(study, key):
            fail(None, f"{key}: set by {_setter_of(study, key)} in every trial, which would silently override "
                       "--set; change it in the study file instead")
    try:
        Config.from_dict(base)
    except ConfigError as exc:
        fail(None, str(exc))
    if _tracking_uri_problem(base):
        fail(None, _tracking_uri_problem(base))
    new = dataclasses.replace(study, base=base, overrides=tuple(overrides), file_base=study.base)
    _validate_trials(new, fail)
    return new


def _tracking_uri_problem(base: dict) -> str | None:
    """'tracking.tracking_uri: why' when the base names a tracking URI klrl cannot use."""
    uri = (base.get("tracking") or {}).get("tracking_uri") or ""
    reason = unsupported_uri(uri) if uri else None
    return f"tracking.tracking_uri: {reason}" if reason else None


def _setter_of(study: Study, key: str) -> str | None:
    """The grid axis or Optuna param that sets field `key` in trials, if any ('grid.run.seed')."""
    for axis in study.axes:
        if any(key in bundle for bundle in axis.bundles):
            return f"grid.{axis.name}"
    if study.optuna and key in study.optuna["params"]:
        return f"optuna.params.{key}"
    return None


def _check_one_setter_per_field(study: Study, fail) -> None:
    """A field set by two axes (an arm and a field axis, or two bundle axes), or by an axis and Optuna, would
    have one setting silently override the other in every trial (later axes win, Optuna wins over axes)."""
    setters: dict[str, list[tuple[str, str]]] = {}  # field -> [(axis name, where in the file)], one per axis
    for axis in study.axes:
        for i, bundle in enumerate(axis.bundles):
            for key in bundle:
                if axis.name not in (name for name, _ in setters.get(key, [])):
                    where = f"grid.{axis.name}" if "." in axis.name else f"grid.{axis.name}[{i}].{key}"
                    setters.setdefault(key, []).append((axis.name, where))
    for key, found in setters.items():
        if len(found) > 1:
            (_, first), (_, second) = found[:2]
            here, other = (first, second) if "[" in first and "[" not in second else (second, first)
            fail(here, f"{key} is also set by {other}; the later axis would silently override the other in "
                       "every trial: set each field in one axis only")
    for key in (study.optuna or {}).get("params", {}):
        if key in setters:
            fail(f"optuna.params.{key}", f"also set by {setters[key][0][1]}; Optuna's sample would silently "
                                         "replace the grid's value in every trial: sample it or grid it, not both")


def _warnings(study: Study) -> tuple[str, ...]:
    """Advisories (core.config.advisories) of every trial config, each named once with where it comes from."""
    out: list[str] = []
    for labels, sampled in study.points():
        for advisory in advisories(study.trial_config(labels, sampled)):
            line = f"{study.path}: {_culprit(study, labels, sampled, error_field(advisory))}: {advisory}"
            if line not in out:
                out.append(line)
    return tuple(out)


def _parse_tune(raw: dict, fail) -> dict:
    tune_opts = raw.get("tune") or {}
    if not isinstance(tune_opts, dict):
        fail("tune", "expected a mapping")
    for key, value in tune_opts.items():
        if key not in TUNE_KEYS:
            fail(f"tune.{key}", f"unknown key; allowed: {list(TUNE_KEYS)}")
        least = 0 if key == "max_failures" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            fail(f"tune.{key}", f"expected a {'non-negative' if least == 0 else 'positive'} integer, got {value!r}")
    return tune_opts


def _grid(raw: dict, fail) -> dict:
    grid = raw.get("grid")
    if grid is None:
        return {}
    if not isinstance(grid, dict) or not grid:
        fail("grid", "expected a non-empty mapping of axis -> list of values (or leave 'grid' out)")
    return grid


def _parse_axis(axis_name: Any, values: Any, fail) -> Axis:
    where = f"grid.{axis_name}"
    if not isinstance(values, list) or not values:
        fail(where, "expected a non-empty list of values")
    labels, bundles = [], []
    for i, value in enumerate(values):
        if "." in str(axis_name):  # field axis: each value sets that one field
            if str(axis_name) not in FIELDS:
                fail(where, f"unknown config field; allowed: {sorted(FIELDS)}")
            if isinstance(value, (dict, list)):
                fail(f"{where}[{i}]", f"expected a scalar value for field {axis_name}, got {type(value).__name__}")
            labels.append(f"{str(axis_name).rsplit('.', 1)[1]}={value}")
            bundles.append({axis_name: value})
        else:  # bundle axis: each value is {dotted field: value, ..., optional name: label}
            if not isinstance(value, dict) or not value:
                fail(f"{where}[{i}]", "a bundle axis (a name without a dot) takes mappings of dotted "
                                      "field -> value, e.g. {algorithm.kl_mode: none}")
            bundle = {k: v for k, v in value.items() if k != "name"}
            for key in bundle:
                if key not in FIELDS:
                    fail(f"{where}[{i}].{key}", f"unknown config field; allowed: {sorted(FIELDS)}")
            if not bundle:
                fail(f"{where}[{i}]", "a bundle must set at least one field")
            labels.append(str(value.get("name") or "-".join(str(v) for v in bundle.values())))
            bundles.append(bundle)
    dupes = sorted({label for label in labels if labels.count(label) > 1})
    if dupes:
        fail(where, f"duplicate values/labels {dupes}; give bundles distinct `name:`s")
    for i, bundle in enumerate(bundles):
        if bundle in bundles[:i]:
            j = bundles.index(bundle)
            fail(f"{where}[{i}]", f"sets exactly what {where}[{j}] ({labels[j]}) sets: two labels for one trial "
                                  "config (for repeats, add seeds)")
    return Axis(name=str(axis_name), labels=tuple(labels), bundles=tuple(bundles))


def _parse_optuna(spec: Any, fail) -> dict:
    if not isinstance(spec, dict):
        fail("optuna", "expected a mapping with metric, mode, num_samples, params")
    for key in spec:
        if key not in OPTUNA_KEYS:
            fail(f"optuna.{key}", f"unknown key; allowed: {list(OPTUNA_KEYS)}")
    if not isinstance(spec.get("metric"), str) or "/" not in spec["metric"]:
        fail("optuna.metric", "required: a reported metric key such as reward/mean or eval/pass@1")
    if spec.get("mode") not in ("min", "max"):
        fail("optuna.mode", f"must be 'min' or 'max', got {spec.get('mode')!r}")
    samples = spec.get("num_samples")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        fail("optuna.num_samples", f"required: a positive integer, got {samples!r}")
    params = spec.get("params")
    if not isinstance(params, dict) or not params:
        fail("optuna.params", "required: a non-empty mapping of dotted field -> {loguniform: [lo, hi]} ...")
    for key, dist in params.items():
        where = f"optuna.params.{key}"
        if key not in FIELDS:
            fail(where, f"unknown config field; allowed: {sorted(FIELDS)}")
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            fail(where, f"expected exactly one of {list(DISTRIBUTIONS)}, e.g. {{loguniform: [1.0e-3, 1.0e-1]}}")
        kind, args = next(iter(dist.items()))
        if not isinstance(args, list) or not args or (kind != "choice" and len(args) != 2):
            fail(f"{where}.{kind}", "expected a list: [low, high] (or the choices)")
        if any(isinstance(a, float) and not math.isfinite(a) for a in args):
            fail(f"{where}.{kind}", f"expected finite values, got {args}")
        if kind != "choice" and not (all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
                                     and args[0] < args[1]):
            fail(f"{where}.{kind}", f"expected numbers [low, high] with low < high, got {args}")
        if kind == "loguniform" and args[0] <= 0:
            fail(f"{where}.{kind}", f"loguniform needs low > 0, got {args[0]}")
    return dict(spec, params=dict(params))


def _extremes(optuna: dict | None) -> list[dict]:
    """Optuna samples to validate: every range end / choice (one param varied at a time)."""
    if not optuna:
        return [{}]
    out = [{}]
    for key, dist in optuna["params"].items():
        kind, args = next(iter(dist.items()))
        out.extend({key: v} for v in args)
        if kind == "randint":
            out[-1] = {key: args[1] - 1}  # Tune's randint excludes the upper bound
    return out


def _validate_trials(study: Study, fail) -> None:
    for labels, sampled in study.points():
        data = _merged(study.base, study.trial_overrides(labels, sampled))
        try:
            Config.from_dict(data)
        except ConfigError as exc:
            fail(_culprit(study, labels, sampled, error_field(exc)), str(exc))


def _culprit(study: Study, labels: dict[str, str], sampled: dict, bad_field: str) -> str:
    """Where in the file the bad value comes from: an Optuna range end, a grid value, or the grid point."""
    if bad_field in sampled:
        return f"optuna.params.{bad_field}={sampled[bad_field]}"
    for axis in study.axes:
        index = axis.labels.index(labels[axis.name])
        if bad_field in axis.bundles[index]:
            return f"grid.{axis.name}[{index}] ({labels[axis.name]})"
    point = ", ".join(f"grid.{a}={lbl}" for a, lbl in labels.items())
    extra = ", ".join(f"optuna.params.{k}={v}" for k, v in sampled.items())
    return ", ".join(p for p in (point, extra) if p) or "base"


def _merged(base: dict, overrides: dict) -> dict:
    data = copy.deepcopy(base)
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return data


def _distribution(spec: dict):
    from ray import tune

    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return tune.choice(args)
    return getattr(tune, kind)(*args)
