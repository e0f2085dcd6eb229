"""`klrl`: run a study, report on it, browse it in MLflow.

    klrl run SPACE.yaml [--set key=value ...] [--address auto|HOST:PORT|ray://HOST:PORT]
                        [--tracking-uri URI] [--storage-path URI] [--resume] [--run-dir DIR]
    klrl submit SPACE.yaml [--address http://HEAD:8265] [--run-dir DIR] [run's options]  # as a Ray job
    klrl validate SPACE.yaml [--set key=value ...]    # check a study file, list its trials, run nothing
                  [--placement [--address ...]]       # + place a trial on Ray and probe its actors' devices
                  [--gpu-memory-gib N]                # + refuse it if `klrl plan` says a GPU runs out of memory
    klrl plan SPACE.yaml [--set key=value ...] [--gpu h100] [--gpu-memory-gib 80]  # GPU memory, GPU-hours
    klrl report STUDY [--out DIR] [--include-unfinished] # STUDY: a run dir, a study file or a study name
    klrl ui [STUDY] [--port 5000]     # MLflow UI on 127.0.0.1; no STUDY: the only (or miniature) study
    klrl config --explain                                # every config field with its docstring

Exit codes: 0 every trial finished; 1 some trial failed or did not finish; 2 bad study file or
arguments; 3 Ray or the tracking store unreachable, or the run dir in use; 130 interrupted.
The default run dir of a study is $KLRL_RUN_DIR/<study name> (./runs/<study name> when unset); caches
(models, HF, vLLM, temp files) go to $KLRL_RUN_DIR/cache (to the run dir's when only --run-dir is given).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from orchestrator import submit

EXIT_OK, EXIT_TRIALS, EXIT_SPEC, EXIT_LAUNCH, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEFAULT_STUDY = "miniature"  # what `make run` runs; `klrl ui` opens it when no study is named


def _err(message: str) -> None:
    print(f"klrl: error: {message}", file=sys.stderr)


def runs_root() -> Path:
    """Where studies live by default: $KLRL_RUN_DIR, else ./runs."""
    return Path(os.environ.get("KLRL_RUN_DIR") or "runs").resolve()


def _warn(message: str) -> None:
    print(f"klrl: warning: {message}", file=sys.stderr)


def _load_checked(space: str, overrides: list[str]):
    """(study, warnings): the study file and its overrides validated, then checked against the model and
    this machine (orchestrator/preflight.py); raises SpecError naming the file or `--set` and the field."""
    from orchestrator.preflight import check_study
    from orchestrator.search_space import load_study

    study = load_study(space, overrides)
    return study, study.warnings + check_study(study)


def default_run_dir(study_name: str, given: str | None) -> Path:
    if given:
        return Path(given).resolve()
    return runs_root() / study_name


def _configure_env(run_dir: Path, given: str | None) -> None:
    """Caches under $KLRL_RUN_DIR, else the run dir's parent ./runs, else --run-dir itself; never $HOME."""
    from workers import environment

    environment.configure(os.environ.get("KLRL_RUN_DIR") or (run_dir if given else run_dir.parent))


def cmd_run(args) -> int:
    from orchestrator.config_io import SpecError
    from orchestrator.search_space import load_study
    from orchestrator.tracking import unsupported_uri

    if args.tracking_uri and unsupported_uri(args.tracking_uri):
        _err(f"--tracking-uri: {unsupported_uri(args.tracking_uri)}")
        return EXIT_SPEC
    try:
        overrides = args.set
        if args.resume and args.set:
            record = default_run_dir(load_study(args.space).name, args.run_dir) / "study.yaml"
            if record.exists():
                _warn(f"--set is ignored with --resume: the study continues as recorded in {record}")
                overrides = []
        study, warnings = _load_checked(args.space, overrides)
    except SpecError as exc:
        _err(str(exc))
        return EXIT_SPEC
    for warning in warnings:
        _warn(warning)
    run_dir = default_run_dir(study.name, args.run_dir)
    if not submit.usable_in_job(run_dir, study.name):
        return EXIT_SPEC
    _configure_env(run_dir, args.run_dir)
    from orchestrator import launch, stale
    from orchestrator.tracking import TrackingError

    try:
        for line in stale.stop_leftovers(run_dir):
            _warn(f"stopped {line}, left running by the run dir's dead driver")
        for line in stale.mark_stale(run_dir, launch.tracking_uri_for(study, run_dir, args.tracking_uri)):
            _warn(f"marked stale, its driver died: {line}")
        study = launch.prepare_run_dir(study, run_dir, args.resume)
        outcome = launch.run_study(study, run_dir, address=args.address, tracking_uri=args.tracking_uri,
                                   resume=args.resume, storage_path=args.storage_path,
                                   shared_storage=args.shared_storage)
    except SpecError as exc:  # --resume rereads the recorded study.yaml, which may predate a newer check
        _err(str(exc))
        return EXIT_SPEC
    except (launch.LaunchError, TrackingError) as exc:
        _err(str(exc))
        return EXIT_LAUNCH
    except KeyboardInterrupt:
        _err(f"interrupted; continue with: klrl run {shlex.quote(args.space)} --resume --run-dir {run_dir}")
        return EXIT_INTERRUPTED
    uri = launch.tracking_uri_for(study, run_dir, args.tracking_uri)
    print(f"klrl: {outcome.finished}/{outcome.total} trial(s) finished, {outcome.failed} failed"
          + (" (interrupted)" if outcome.interrupted else ""))
    if outcome.finished:
        _write_report(launch.experiment_name(study), uri, run_dir / "report", include_unfinished=False)
    print(f"klrl: MLflow UI: klrl ui {run_dir}   (or: mlflow ui --backend-store-uri {uri} --host 127.0.0.1)")
    if outcome.interrupted:
        print(f"klrl: continue with: klrl run {shlex.quote(args.space)} --resume --run-dir {run_dir}")
    return EXIT_OK if outcome.ok else (EXIT_INTERRUPTED if outcome.interrupted else EXIT_TRIALS)


def cmd_submit(args) -> int:
    from orchestrator.config_io import SpecError
    from orchestrator.search_space import load_study

    try:
        study = load_study(args.space, args.set)  # a bad study fails here, before anything is uploaded
    except SpecError as exc:
        _err(str(exc))
        return EXIT_SPEC
    run_dir = default_run_dir(study.name, args.run_dir)
    try:
        # The default run dir is this machine's, so the cluster is too: share its caches (tiny models, HF).
        return submit.submit(args, run_dir, cache_root=None if args.run_dir else runs_root())
    except submit.SubmitError as exc:
        _err(str(exc))
        return EXIT_LAUNCH


def _write_report(experiment: str, uri: str, out_dir: Path, include_unfinished: bool) -> Path | None:
    try:
        from orchestrator.report import write_report

        path = write_report(experiment, uri, out_dir, include_unfinished=include_unfinished)
    except Exception as exc:  # the study's runs are safe in MLflow; a report failure must not hide that
        _err(f"report not written: {type(exc).__name__}: {exc}")
        return None
    print(f"klrl: report: {path}")
    return path


def cmd_validate(args) -> int:
    from orchestrator.config_io import SpecError

    try:
        study, warnings = _load_checked(args.space, args.set)
    except SpecError as exc:
        _err(str(exc))
        return EXIT_SPEC
    for warning in warnings:
        _warn(warning)
    from orchestrator.naming import short_trial_name

    print(f"{study.path}: study {study.name!r} is valid: {study.num_trials()} trial(s)")
    for labels in study.grid():
        cfg = study.trial_config(labels)
        estimator = cfg.algorithm.kl_estimator if cfg.algorithm.kl_mode != "none" else "-"
        print(f"  {short_trial_name(study, labels):16s} {study.trial_name(labels):32s} "
              f"kl_mode={cfg.algorithm.kl_mode} kl_estimator={estimator} seed={cfg.run.seed} task={cfg.task.name} "
              f"steps={cfg.run.steps}")
    if study.optuna:
        print(f"  Optuna: {study.optuna['num_samples']} samples of {sorted(study.optuna['params'])}, "
              f"{study.optuna['mode']} {study.optuna['metric']}")
    if args.gpu_memory_gib:
        from orchestrator.plan import PlanError, check_study

        try:
            refusals = check_study(study, args.gpu_memory_gib)
        except PlanError as exc:
            refusals = [str(exc)]
        for line in refusals:
            _err(f"{args.space}: {line} (details: klrl plan {args.space})")
        if refusals:
            return EXIT_SPEC
    return _placement_dry_run(study, args) if args.placement else EXIT_OK


def _placement_dry_run(study, args) -> int:
    """`validate --placement`: orchestrator/dry_run.py on the cluster a `klrl run` would use."""
    run_dir = default_run_dir(study.name, args.run_dir)
    _configure_env(run_dir, args.run_dir)
    from orchestrator import launch
    from orchestrator.dry_run import placement_dry_run

    try:
        launch.check_ray_address(args.address)
        problems = placement_dry_run(study, run_dir, args.address)
    except launch.LaunchError as exc:
        _err(str(exc))
        return EXIT_LAUNCH
    for problem in problems:
        _err(problem)
    if problems:
        _err(f"placement dry run: {len(problems)} problem(s); no trial would start as configured")
        return EXIT_LAUNCH
    print("klrl: placement dry run passed: every actor would start on the device it was given (no model loaded)")
    return EXIT_OK


def _locate(study_arg: str | None, tracking_uri: str | None) -> tuple[str, str, Path]:
    """(experiment name, tracking URI, run dir) from a run dir, a study file or a study name."""
    from orchestrator.tracking import default_uri

    path = Path(study_arg or ".")
    if study_arg and path.suffix in (".yaml", ".yml") and path.is_file():
        from orchestrator.search_space import load_study

        study = load_study(path)
        run_dir, name = default_run_dir(study.name, None), study.name
        name = study.base.get("tracking", {}).get("experiment") or name
    elif study_arg and (path / "study.yaml").is_file():
        from orchestrator.config_io import load_yaml

        # The record of a study already run: only its names are needed, and it may predate a newer check.
        run_dir, raw = path.resolve(), load_yaml(path / "study.yaml")
        name = (raw.get("base") or {}).get("tracking", {}).get("experiment") or raw["name"]
    elif study_arg:
        run_dir, name = default_run_dir(study_arg, None), study_arg
    else:
        raise ValueError("name a study: a run dir, a study file or a study name")
    state = run_dir / "driver.json"
    stored = json.loads(state.read_text()).get("tracking_uri") if state.is_file() else None
    return name, tracking_uri or stored or default_uri(run_dir), run_dir


def cmd_report(args) -> int:
    try:
        name, uri, run_dir = _locate(args.study, args.tracking_uri)
    except Exception as exc:
        _err(str(exc))
        return EXIT_SPEC
    _configure_env(run_dir, None)  # before MLflow and matplotlib write their caches (never into $HOME)
    out = Path(args.out).resolve() if args.out else run_dir / "report"
    _print_stale(run_dir, uri)
    return EXIT_OK if _write_report(name, uri, out, args.include_unfinished) else EXIT_TRIALS


def studies_under(root: Path) -> list[Path]:
    """Run dirs of the studies under root (folders holding a study.yaml), by name."""
    return sorted(p.parent for p in root.glob("*/study.yaml")) if root.is_dir() else []


def _default_study() -> str:
    """The study `klrl ui` opens when none is named: the only one under the runs root, else miniature."""
    root = runs_root()
    found = studies_under(root)
    names = [p.name for p in found]
    if len(found) == 1 or DEFAULT_STUDY in names:
        chosen = found[0] if len(found) == 1 else root / DEFAULT_STUDY
        if len(found) > 1:
            print(f"klrl: opening {DEFAULT_STUDY}; the other studies under {root}: "
                  f"{', '.join(n for n in names if n != DEFAULT_STUDY)} (klrl ui NAME)")
        return str(chosen)
    if not found:
        raise ValueError(f"no study under {root}: run one first (make run), or name a run dir, "
                         "study file or study name")
    raise ValueError(f"{len(found)} studies under {root}: name one: " + ", ".join(f"klrl ui {n}" for n in names))


def cmd_ui(args) -> int:
    try:
        _, uri, run_dir = _locate(args.study or _default_study(), args.tracking_uri)
    except Exception as exc:
        _err(str(exc))
        return EXIT_SPEC
    from orchestrator.tracking import ui_url

    state = run_dir / "driver.json"
    experiment_id = json.loads(state.read_text()).get("experiment_id") if state.is_file() else None
    if state.is_file():
        _configure_env(run_dir, None)
        _print_stale(run_dir, uri)
    if uri.startswith(("http://", "https://")):
        print(f"klrl: the study is tracked on a server already: open "
              f"{ui_url(uri, experiment_id) if experiment_id else uri}")
        return EXIT_OK
    if not run_dir.is_dir():
        _err(f"no study at {run_dir}: run it first, or name a run dir, study file or study name")
        return EXIT_SPEC
    _configure_env(run_dir, None)  # the UI process inherits it: no MLflow telemetry or lock file outside
    mlflow = Path(sys.executable).with_name("mlflow")
    argv = [str(mlflow) if mlflow.exists() else "mlflow", "ui", "--backend-store-uri", uri,
            "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]  # one person's browser, not 4
    base = f"http://127.0.0.1:{args.port}"
    print(f"klrl: MLflow UI for {run_dir} (Ctrl-C stops it): {' '.join(argv)}")
    print(f"klrl: open {ui_url(base, experiment_id) if experiment_id else base}", flush=True)
    os.execvp(argv[0], argv)
    return EXIT_OK  # pragma: no cover


def _print_stale(run_dir: Path, uri: str) -> None:
    """Runs left open by a dead driver (orchestrator/stale.py), marked now if not yet."""
    from orchestrator.stale import describe_stale, stop_leftovers

    for line in stop_leftovers(run_dir):
        print(f"klrl: stopped {line}, left running by the run dir's dead driver")
    for line in describe_stale(run_dir, uri):
        print(f"klrl: {line} (MLflow filter: tags.`klrl.stale` = 'true')")


def cmd_config(args) -> int:
    import dataclasses
    import typing

    from core.config import Config

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                yield f"{prefix}{f.name}", default, f.metadata.get("doc", "")

    for name, default, doc in walk(Config):
        print(f"{name} = {default!r}\n    {doc}" if args.explain else f"{name}: {default!r}")
    return EXIT_OK


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"klrl {version('klrl')}"
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "klrl (not installed)"


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options `klrl run` and `klrl submit` share (submit passes them on to the job's `klrl run`)."""
    p.add_argument("space", help="study file, e.g. search_spaces/miniature.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config field, e.g. --set run.steps=5 (repeatable)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in the run dir)")
    p.add_argument("--storage-path", default=None,
                   help="Tune checkpoints and experiment state: a path every node shares (NFS/EFS) or a "
                        "bucket URI like s3://bucket/klrl; required on multi-node clusters "
                        "(default: <run dir>/tune)")
    p.add_argument("--shared-storage", action="store_true",
                   help="declare that --storage-path is a local path every Ray node mounts at the same place "
                        "(a shared mount klrl does not recognise, or several nodes on one machine)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study in --run-dir")
    root = os.environ.get("KLRL_RUN_DIR")
    p.add_argument("--run-dir", default=None,
                   help=f"study directory (default: {root}/<study>, from $KLRL_RUN_DIR)" if root else
                   "study directory (default: ./runs/<study>, or $KLRL_RUN_DIR/<study> when KLRL_RUN_DIR is set)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="klrl", description="Ray-native studies of KL regularisation in RL "
                                                         "fine-tuning of LLMs")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or --resume) a study: search_spaces/<study>.yaml")
    _add_run_options(run)
    run.add_argument("--address", default=None, help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT "
                                                     "(default: start a local Ray)")
    run.set_defaults(func=cmd_run)
    job = sub.add_parser("submit", help="run a study as a Ray job on a running cluster (uploads this folder)",
                         description="Submit `klrl run SPACE` as a Ray job: uploads the working dir, passes "
                                     "the absolute run dir and this checkout's git commit, prints the job id, "
                                     "follows the job's logs and exits with the job's exit code.")
    _add_run_options(job)
    job.add_argument("--address", default=None,
                     help=f"the cluster's dashboard (default: $RAY_ADDRESS, else {submit.DEFAULT_ADDRESS})")
    job.add_argument("--job-id", default=None, help="submission id for the job (default: Ray picks one)")
    job.add_argument("--no-wait", action="store_true", help="print the job id and return without following")
    job.set_defaults(func=cmd_submit)
    val = sub.add_parser("validate", help="validate a study file and list its trials")
    val.add_argument("space", help="study file, e.g. search_spaces/miniature.yaml")
    val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a base config field, as with `klrl run` (repeatable)")
    val.add_argument("--placement", action="store_true",
                     help="also create a trial's placement group on Ray and start a probe actor in each bundle "
                          "with the real actors' options; reports every actor's device; loads no model")
    val.add_argument("--address", default=None, help="Ray cluster for --placement (default: start a local Ray)")
    val.add_argument("--run-dir", default=None, help="for --placement with a local Ray: its temp dir's home")
    val.add_argument("--gpu-memory-gib", type=float, default=None,
                     help="also refuse the study if `klrl plan`'s memory estimate exceeds this GPU memory")
    val.set_defaults(func=cmd_validate)
    from orchestrator.plan import add_parser as add_plan_parser

    add_plan_parser(sub)
    rep = sub.add_parser("report", help="write report.md, summary.csv and plots for a study")
    rep.add_argument("study", help="run dir, study file or study name")
    rep.add_argument("--tracking-uri", default=None,
                     help="MLflow tracking URI (default: the one the study ran with, from <run dir>/driver.json)")
    rep.add_argument("--out", default=None, help="output folder (default: <run dir>/report)")
    rep.add_argument("--include-unfinished", action="store_true",
                     help="let trials that stopped before their last step enter the confidence intervals "
                          "and tests (they are always plotted and listed)")
    rep.set_defaults(func=cmd_report)
    ui = sub.add_parser("ui", help="MLflow UI on 127.0.0.1 for a study's store")
    ui.add_argument("study", nargs="?", default=None,
                    help=f"run dir, study file or study name (default: the only study under the runs folder, "
                         f"else {DEFAULT_STUDY}; with several and no {DEFAULT_STUDY}, they are listed)")
    ui.add_argument("--tracking-uri", default=None,
                    help="MLflow tracking URI (default: the one the study ran with, from <run dir>/driver.json)")
    ui.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default: 5000)")
    ui.set_defaults(func=cmd_ui)
    cfg = sub.add_parser("config", help="list every config field (with --explain: its docstring)")
    cfg.add_argument("--explain", action="store_true", help="print each field's docstring under it")
    cfg.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
