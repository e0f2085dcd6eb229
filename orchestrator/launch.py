"""The driver: connect to Ray, open the study's MLflow runs, run (or resume) the Tune study, close up.

Order matters: the tracking store, the Ray address and the cluster (GPUs, node resources, the multi-node
storage guard) are checked first (fail in seconds, before any MLflow run or trial starts), the MLflow
experiment and parent run are created here and not in the trials (concurrent trials would race to create
the experiment), and whatever happens (all done, a failed trial, SIGINT or SIGTERM) the driver ends every
child run a killed trial could not end itself, so no run stays RUNNING.

Run directory layout (one study per directory):
    <run_dir>/study.yaml      the study as run (overrides applied), reread by --resume
    <run_dir>/driver.json     MLflow ids of the study (experiment, parent run), Tune storage; reread by --resume;
                              the live driver's pid/host/start, Ray address and processes (orchestrator/stale.py)
    <run_dir>/reaper.log      what the watcher stopped after a driver died (orchestrator/reaper.py)
    <run_dir>/tune/<name>/    Tune's experiment state, trial folders with klrl's checkpoints (or --storage-path/<name>)
    <run_dir>/mlflow.db, mlartifacts/   default MLflow store
    <run_dir>/ray/            Ray's temp dir when klrl starts Ray itself
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from orchestrator import processes, reaper, stale
from orchestrator.search_space import Study
from orchestrator.tracking import ROLE_TAG, STUDY_TAG, check_reachable, default_uri, git_commit, make_tracker


class LaunchError(RuntimeError):
    """The study cannot start (Ray or the tracking store unreachable, run dir in use); says how to fix it."""


@dataclass
class Outcome:
    finished: int
    total: int
    failed: int
    interrupted: bool

    @property
    def ok(self) -> bool:
        return self.total > 0 and self.finished == self.total and not self.interrupted


def tracking_uri_for(study: Study, run_dir: Path, override: str | None) -> str:
    return override or study.base.get("tracking", {}).get("tracking_uri") or default_uri(run_dir)


def experiment_name(study: Study) -> str:
    return study.base.get("tracking", {}).get("experiment") or study.name


def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """A TCP probe of ray://host:port or host:port (Ray's own client retries for a long time)."""
    if not address or address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if not parsed.hostname or not parsed.port:
        raise LaunchError(f"--address {address!r}: expected auto, host:port or ray://host:port")
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s).close()
    except OSError as exc:
        raise LaunchError(f"Ray cluster at {address} is unreachable ({exc.strerror or exc}); start it with "
                          f"`ray start --head` or `ray up cluster.yaml`, or leave out --address") from None


def connect_ray(address: str | None, run_dir: Path):
    """Join a cluster, or start an embedded local Ray (all CPUs, temp dir in the run dir, no dashboard)."""
    import ray

    from workers import environment

    env_vars = {**environment.actor_env_vars(), "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    runtime_env = {"env_vars": env_vars}
    # Engine logs (vLLM, DeepSpeed) from every actor drown Tune's progress table; they stay in
    # <temp dir>/session_latest/logs, and KLRL_WORKER_LOGS=1 streams them to the terminal.
    worker_logs = os.environ.get("KLRL_WORKER_LOGS", "0") == "1"
    if address is None and "RAY_ADDRESS" not in os.environ:
        return ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                        _temp_dir=str(environment.ray_temp_dir(run_dir)),
                        runtime_env=runtime_env, log_to_driver=worker_logs)
    try:
        return ray.init(address=address or os.environ.get("RAY_ADDRESS"), runtime_env=runtime_env,
                        log_to_driver=worker_logs)
    except ConnectionError as exc:
        raise LaunchError(f"cannot connect to Ray at {address or os.environ.get('RAY_ADDRESS')}: {exc}") from None


def storage_for(run_dir: Path, given: str | None, resume: bool) -> str:
    """Tune's storage_path: --storage-path, else what the study used (on --resume), else <run_dir>/tune."""
    state_file = run_dir / "driver.json"
    if given is None and resume and state_file.exists():
        given = json.loads(state_file.read_text()).get("storage_path")
    given = given or str(run_dir / "tune")
    return given if "://" in given else str(Path(given).resolve())


SHARED_FS_TYPES = ("nfs", "nfs4", "efs", "lustre", "cifs", "smb3", "ceph", "gpfs", "beegfs", "glusterfs", "fuse")


def on_shared_filesystem(path: str) -> bool:
    """True if path's mount (longest matching /proc/mounts entry) is a network or FUSE filesystem."""
    target, best, fstype = str(Path(path).resolve()), "", ""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and (target == fields[1] or target.startswith(fields[1].rstrip("/") + "/")) \
                and len(fields[1]) > len(best):
            best, fstype = fields[1], fields[2]
    return fstype.startswith(SHARED_FS_TYPES)


def check_multi_node_storage(uri: str, storage: str, trial_resources: dict[str, float],
                             shared_storage: bool = False) -> None:
    """On a multi-node cluster, refuse node-local stores before any trial starts.

    Trials run on worker nodes, where a sqlite/file MLflow store or a Tune storage path on the driver's
    local disk is a *different* file: their runs and checkpoints would never reach the driver (Tune
    itself only fails at the first checkpoint, minutes in). A cluster counts as multi-node when it has
    two nodes now, or when one trial needs more of a resource than it has now (an autoscaler will add
    nodes, e.g. cluster.yaml's GPU workers behind a GPU-less head). A local storage path passes when its
    mount is a network filesystem or when the user declares it shared (`shared_storage`, `--shared-storage`:
    a mount klrl does not recognise, or several nodes on one machine); a file-based tracking store never
    does (concurrent sqlite writers over a network filesystem corrupt it).
    """
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    have = ray.cluster_resources()
    will_scale = any(need > have.get(key, 0.0) for key, need in trial_resources.items())
    if nodes < 2 and not will_scale:
        return
    parsed = urlparse(uri)
    problems = []
    if parsed.scheme in ("", "file", "sqlite"):
        problems.append(f"--tracking-uri {uri} (start `mlflow server` and pass http://<host>:5000)")
    if "://" not in storage and not (shared_storage or on_shared_filesystem(storage)):
        problems.append(f"--storage-path {storage} (pass s3://<bucket>/klrl, a path on a shared mount, or "
                        "--shared-storage if every node mounts it)")
    if problems:
        why = f"has {nodes} nodes" if nodes > 1 else "must add nodes for a trial (it lacks the resources)"
        raise LaunchError(f"this Ray cluster {why}, and trials on other nodes than this driver's cannot "
                          "reach a node-local store: " + "; ".join(problems))


def check_node_resources(study: Study) -> None:
    """Refuse a learner/rollout.node_resource that no node of the cluster has and no autoscaler could add
    (Tune would wait forever for the trial's placement group)."""
    import ray

    have = ray.cluster_resources()
    configs = [study.trial_config(labels) for labels in study.grid()] or [study.trial_config({})]
    for config in configs:
        for role in ("learner", "rollout"):
            name = getattr(config, role).node_resource
            if name and name not in have and autoscaler_limit(name) is None:
                raise LaunchError(f"{role}.node_resource: no node of this Ray cluster has resource {name!r} and "
                                  f"no autoscaler could add one; start a node with `ray start --resources="
                                  f"'{{\"{name}\": 1}}'` or unset it (cluster has {sorted(have)})")


def max_trial_resources(study: Study) -> dict[str, float]:
    """The most of each resource (CPU, GPU) that one trial of the study asks for."""
    from workers.engines import bundles_for

    out: dict[str, float] = {}
    configs = [study.trial_config(labels) for labels in study.grid()] or [study.trial_config({})]
    for config in configs:
        for key in ("CPU", "GPU"):
            out[key] = max(out.get(key, 0.0), sum(b.get(key, 0.0) for b in bundles_for(config)))
    return out


def gpu_fields(config) -> str:
    """The fields that make a trial ask for GPUs, e.g. 'learner.gpus_per_worker=1 (x2 learners), ...'."""
    asks = [f"{name}.gpus_per_worker={section.gpus_per_worker:g} (x{section.num_workers} {name}s)"
            for name, section in (("learner", config.learner), ("rollout", config.rollout))
            if section.gpus_per_worker > 0]
    return ", ".join(asks)


def autoscaler_limit(resource: str) -> float | None:
    """The most of `resource` an autoscaler could give the connected Ray cluster; None without one."""
    from ray._private import ray_constants
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    return scaling_limit(resource, state.get_max_resources_from_cluster_config(),
                         _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS))


def scaling_limit(resource: str, group_limits: dict | None, status: bytes | None) -> float | None:
    """An autoscaler that publishes its node groups (autoscaler v2, KubeRay) gives `group_limits`, an
    exact limit. The cluster launcher's (v1, cluster.yaml) publishes only its status, whose node types
    are the config's ('head', 'gpu_worker'); its limit is taken as unbounded. A plain `ray start` or
    `ray.init` runs a read-only monitor whose node types are the live nodes' ids ('node_<hex>'): None."""
    if group_limits is not None:
        return float(group_limits.get(resource, 0))
    report = (json.loads(status).get("autoscaler_report") or {}) if status else {}
    node_types = set(report.get("active_nodes") or {}) | set(report.get("pending_launches") or {})
    return float("inf") if any(not t.startswith("node_") for t in node_types) else None


def check_cluster_gpus(study: Study, address: str | None = None) -> None:
    """Refuse, before any trial starts, a study whose trial asks for more GPUs than the connected Ray
    cluster has and no autoscaler could add (Tune would wait forever for its placement group), or NCCL
    on learners without GPUs. The message names the fields."""
    import ray

    from workers.engines import bundles_for

    configs = [study.trial_config(labels) for labels in study.grid()] or [study.trial_config({})]
    if any(c.learner.backend == "nccl" and c.learner.gpus_per_worker == 0 for c in configs):
        raise LaunchError("learner.backend: 'nccl' needs learner.gpus_per_worker > 0; use 'auto' or 'gloo' "
                          "for CPU learners")
    need = max_trial_resources(study).get("GPU", 0.0)
    have = ray.cluster_resources().get("GPU", 0.0)
    limit = autoscaler_limit("GPU") if need > have else None
    if need <= have or (limit is not None and need <= limit):
        return
    config = max(configs, key=lambda c: sum(b.get("GPU", 0.0) for b in bundles_for(c)))
    where = f"at {address}" if address else "started here"
    scaler = "no autoscaler that could add GPU nodes" if limit is None else f"an autoscaler limit of {limit:g}"
    raise LaunchError(f"{gpu_fields(config)}: a trial asks for {need:g} GPU(s) but the Ray cluster {where} has "
                      f"{have:g} and {scaler}; run on a GPU cluster (cluster.yaml, docs/GPU.md) or set "
                      "learner.gpus_per_worker=0 and rollout.gpus_per_worker=0 to run on CPUs")


def open_study_runs(study: Study, run_dir: Path, uri: str, resume: bool, storage: str):
    """(tracker, experiment id, parent run id); --resume reopens the parent run of the interrupted study."""
    tracker = make_tracker(uri)
    state_file = run_dir / "driver.json"
    if resume and state_file.exists():
        state = json.loads(state_file.read_text())
        tracker.reopen(state["parent_run_id"])
        return tracker, state["experiment_id"], state["parent_run_id"]
    experiment_id = tracker.ensure_experiment(experiment_name(study), artifact_dir=run_dir / "mlartifacts")
    parent = tracker.start_run(experiment_id, study.name, {STUDY_TAG: study.name, ROLE_TAG: "study",
                                                           "klrl.run_dir": str(run_dir), "git_commit": git_commit()})
    tracker.log_params(parent, {"study.file": study.path, "study.trials": study.num_trials(),
                                "study.axes": ",".join(a.name for a in study.axes) or "-"})
    tracker.log_text(parent, (run_dir / "study.yaml").read_text(), "study.yaml")
    state_file.write_text(json.dumps({"experiment_id": experiment_id, "parent_run_id": parent, "tracking_uri": uri,
                                      "storage_path": storage}))
    return tracker, experiment_id, parent


def build_tuner(study: Study, setup, storage: str, resume: bool):
    """The Tuner of the study (or, with resume, the restored one).

    Tune reuses a finished trial's trainable process for the next trial with the same resources
    (`reuse_actors`): the process keeps its placement group and its engines (workers/engines.py), so
    only the first trial on them pays their start-up. Checkpoints are klrl's own (orchestrator/
    checkpoint.py), not Tune's: Tune's experiment state is saved every few seconds, so after a driver
    SIGKILL it points at an older checkpoint than the newest one a trial wrote, and it lists checkpoints
    its `num_to_keep` retention already deleted (deleting them again fails in `_delete_fs_path` with
    "Error handling checkpoint ... FileNotFoundError"). Trials find their newest complete checkpoint
    themselves.
    """
    from ray import tune

    from orchestrator.progress import StartEndReporter, StudyProgress, quiet_tune_output
    from orchestrator.trainable import NoRetryAfterNonFinite, train
    from workers.engines import bundles_for

    quiet_tune_output()

    def resources(tune_config: dict):
        config = study.trial_config(tune_config.get("grid", {}), tune_config.get("search", {}))
        return tune.PlacementGroupFactory(bundles_for(config))

    trainable = tune.with_resources(tune.with_parameters(train, setup=setup), resources)
    if resume:
        path = f"{storage.rstrip('/')}/{study.name}"
        if not tune.Tuner.can_restore(path):
            raise LaunchError(f"--resume: no Tune experiment to resume under {path}")
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    axis_columns = {f"grid/{a.name}": a.name for a in study.axes}
    axis_columns.update({f"search/{k}": k.rsplit(".", 1)[1] for k in (study.optuna or {}).get("params", {})})
    reporter = StartEndReporter(
        metric_columns={"step": "step", "reward/mean": "reward", "kl/k1_mean": "kl_k1",
                        "entropy/token_mean": "entropy", "time/step_s": "step_s"},
        parameter_columns=axis_columns, sort_by_metric=False)
    run_config = tune.RunConfig(
        name=study.name, storage_path=storage, progress_reporter=reporter, verbose=1,
        failure_config=tune.FailureConfig(max_failures=study.tune.get("max_failures", 1)),
        callbacks=[NoRetryAfterNonFinite(), StudyProgress(study)])
    tune_config = study.tune_config()
    tune_config.reuse_actors = True
    tune_config.trial_name_creator = lambda t: _short_name(study, t)
    tune_config.trial_dirname_creator = lambda t: f"trial_{t.trial_id}"  # trainable.py's checkpoints live here
    return tune.Tuner(trainable, param_space=study.param_space(), tune_config=tune_config, run_config=run_config)


def _short_name(study: Study, t) -> str:
    return f"{study.trial_name(t.config.get('grid', {})).replace(' ', '_')}_{t.trial_id[-5:]}"


def summarize(study: Study, results) -> Outcome:
    """Count trials that reported their last step without error."""
    finished = failed = 0
    for result in results:
        if result.error is not None:
            failed += 1
            continue
        cfg, metrics = result.config or {}, result.metrics or {}
        if not metrics or "grid" not in cfg:  # never started (e.g. the study was interrupted first)
            continue
        steps = study.trial_config(cfg["grid"], cfg.get("search", {})).run.steps
        finished += int(metrics.get("step", 0) >= steps)
    total = study.num_trials()
    return Outcome(finished=finished, total=total, failed=failed, interrupted=finished + failed < total)


def prebuild_policies(study: Study, run_dir: Path, log=print) -> None:
    """Build and warm-start each distinct tiny policy once, here, before trials start.

    A trial would build it too (under a file lock), but inside a trial the warm start competes with
    the other trials' engines and its minutes would be charged to the first trial's step times.
    """
    from tasks.policy import resolve_policy
    from workers import environment

    seen = set()
    for labels in study.grid():
        config = study.trial_config(labels)
        key = (config.model, config.task)
        if config.model.path == "tiny" and key not in seen:
            seen.add(key)
            log(f"klrl: preparing the tiny policy (cached under {environment.run_dir(run_dir)}/models)")
            resolve_policy(config.model, environment.run_dir(run_dir), config.task, log=log)


def _sigterm_as_sigint(signum, frame):
    # Tune stops gracefully on SIGINT (saves its state for --resume); give SIGTERM the same path.
    os.kill(os.getpid(), signal.SIGINT)


def run_study(study: Study, run_dir: Path, address: str | None = None, tracking_uri: str | None = None,
              resume: bool = False, storage_path: str | None = None, shared_storage: bool = False,
              log=print) -> Outcome:
    """Run or resume a validated study; returns the Outcome (the CLI exits 0 iff outcome.ok)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's CLIReporter table instead of the AIR output
    uri = tracking_uri_for(study, run_dir, tracking_uri)
    check_reachable(uri)
    check_ray_address(address)
    storage = storage_for(run_dir, storage_path, resume)
    if not resume and (run_dir / "tune" / study.name).exists():
        raise LaunchError(f"{run_dir} already holds study {study.name!r}: pass --resume to continue it, "
                          f"another --run-dir, or delete {run_dir}")
    watcher = reaper.start(run_dir)  # an embedded Ray dies with this driver, even a SIGKILLed one
    try:  # the cluster's checks come before any MLflow run or warm start: a refusal leaves nothing behind
        connect_ray(address, run_dir)
        check_cluster_gpus(study, address)
        check_multi_node_storage(uri, storage, max_trial_resources(study), shared_storage)
        check_node_resources(study)
        tracker, experiment_id, parent = open_study_runs(study, run_dir, uri, resume, storage)
        # This process drives the run dir now: a later klrl can tell if it died (orchestrator/stale.py), and
        # the fault tests find this study's actors by the Ray address.
        stale.record_driver(run_dir, ray_address=_gcs_address(), own_processes=_own_processes(watcher))
    except BaseException:
        _shutdown_ray(watcher)
        raise
    from orchestrator.trainable import TrialSetup

    setup = TrialSetup(study=study, run_dir=str(run_dir), tracking_uri=uri, experiment_id=experiment_id,
                       parent_run_id=parent, storage_path=storage, git_commit=git_commit())
    status, previous = "KILLED", None
    try:
        prebuild_policies(study, run_dir, log)
        # After ray.init, which installs its own (aborting) SIGTERM handler in the driver.
        previous = signal.signal(signal.SIGTERM, _sigterm_as_sigint)
        tuner = build_tuner(study, setup, storage, resume)
        log(f"klrl: study {study.name!r}: {study.num_trials()} trial(s); run dir {run_dir}; MLflow {uri}")
        outcome = summarize(study, tuner.fit())
        status = "FINISHED" if outcome.ok else ("KILLED" if outcome.interrupted else "FAILED")
        return outcome
    except BaseException:
        status = "KILLED"
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        closed = tracker.end_open_children(experiment_id, parent, "FAILED" if status == "FAILED" else "KILLED")
        if closed:
            log(f"klrl: marked {closed} unfinished trial run(s) {'FAILED' if status == 'FAILED' else 'KILLED'}")
        tracker.end_run(parent, status)
        _shutdown_ray(watcher)


def _gcs_address() -> str | None:
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # a Ray Client (ray://) connection has no GCS address of its own
        return None


def _own_processes(watcher) -> list[processes.Identity]:
    """This driver's descendants now (an embedded Ray's processes), less the watcher: driver.json keeps them
    so a later klrl can stop what a dead driver left if the watcher died too (orchestrator/stale.py)."""
    return [p for p in processes.descendants(os.getpid()) if watcher is None or p[0] != watcher.pid]


def _shutdown_ray(watcher) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    reaper.stop(watcher)


def prepare_run_dir(study: Study, run_dir: Path, resume: bool) -> Study:
    """Make the run dir, record the study as run (study.yaml); --resume rereads that record instead."""
    from orchestrator.config_io import dump_yaml
    from orchestrator.search_space import load_study

    run_dir.mkdir(parents=True, exist_ok=True)
    record = run_dir / "study.yaml"
    if resume and record.exists():
        return load_study(record)
    raw = {"name": study.name, "description": study.description, "base": study.base,
           "grid": {a.name: [dict(b, name=lbl) if "." not in a.name else b[a.name]
                             for lbl, b in zip(a.labels, a.bundles)] for a in study.axes} or None,
           "optuna": study.optuna, "tune": study.tune or None}
    dump_yaml({k: v for k, v in raw.items() if v not in (None, "")}, record)
    return study


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `klrl` command")
