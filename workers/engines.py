"""A trial's engines: where they are placed, how they start, and the pool that keeps them for the next trial.

Layout of a trial's resources (`bundles_for`): an empty head bundle for the Tune trainable, then one
bundle per learner actor, then one per rollout actor. Ray Tune drops an all-zero head bundle
(`ray.air.execution.resources.request.ResourceRequest` sets `head_bundle_is_empty` and pops it): the
trainable then holds no reserved CPU and the trial's placement group holds only the worker bundles,
so inside the trainable learner i sits in bundle i and rollout j in bundle num_learners + j. The
trial's own work (rewards, metrics) is light next to the engines, so a trial fits in 2 CPUs:
learner 1 + rollout 1. `create_placement_group` builds the same worker bundles outside Tune (tests,
benchmarks).

Reuse: starting vLLM and DeepSpeed costs seconds to minutes, a miniature trial's steps about as much.
Tune (`reuse_actors`) keeps a finished trial's trainable process, and with it its placement group, for
the next trial that asks for the same bundles; `POOL` in that process holds the engines, keyed by
everything they bake in at construction (model folder, dtype, ZeRO stage, world sizes, vLLM's
max_model_len and KV cache, ...: `engine_key`). A trial with the same key gets them back reset to
exactly what a fresh build would be (`Engines.reset`); any other key, or a dead actor, builds anew.
The collective weight-sync group (`rollout.weight_sync: collective`) is not kept: it is the trial's,
closed when the trial ends (`EnginePool.release`, and by any reset or shutdown), and reused engines build
a new one at their next trial's first sync. Rebuilding costs well under a second (docs/BENCHMARKS.md),
and no trial inherits a group another trial may have left mid-collective or with a dead peer.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group

from core.config import Config
from workers import learner as learner_worker
from workers import rollout as rollout_worker
from workers.actors import START_TIMEOUT_S, LearnerGroup, RolloutGroup

# ---- placement ----------------------------------------------------------------------------------------


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}


def worker_bundles(config: Config) -> list[dict[str, float]]:
    """One bundle per learner actor, then one per rollout actor (the placement group's bundles)."""
    lc, rc = config.learner, config.rollout
    return ([_bundle(lc.cpus_per_worker, lc.gpus_per_worker)] * lc.num_workers
            + [_bundle(rc.cpus_per_worker, rc.gpus_per_worker)] * rc.num_workers)


def bundles_for(config: Config) -> list[dict[str, float]]:
    """Bundles for `tune.PlacementGroupFactory`: an empty head (dropped by Tune) + worker_bundles."""
    return [{"CPU": 0.0}] + worker_bundles(config)


def create_placement_group(config: Config, rollouts: bool = True,
                           timeout_s: float = START_TIMEOUT_S) -> PlacementGroup:
    """A placement group of worker_bundles(config) (learners only when not `rollouts`), reserved with
    PACK (one node when it fits). Refuses at once a request larger than the whole cluster."""
    bundles = worker_bundles(config)[:None if rollouts else config.learner.num_workers]
    total = ray.cluster_resources()
    for key in ("CPU", "GPU"):
        need = sum(b.get(key, 0.0) for b in bundles)
        if need > total.get(key, 0.0):
            raise ValueError(f"placement group needs {need:g} {key} ({bundles}) but the Ray cluster has "
                             f"{total.get(key, 0.0):g}; lower learner/rollout num_workers or cpus_per_worker")
    pg = placement_group(bundles, strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        raise TimeoutError(f"placement group {bundles} not ready after {timeout_s:.0f} s; "
                           f"the cluster has {ray.available_resources()} free") from None
    return pg


# ---- model folder ----------------------------------------------------------------------------------------

def model_folder(config: Config, run_dir: str | Path) -> Path:
    """The policy's folder: 'tiny' built (cached under run_dir/models), a local folder checked, a hub id
    looked up in the local Hugging Face cache (klrl never downloads mid-study: cluster.yaml's setup
    pre-fetches the seed studies' policy on every node)."""
    from tasks.policy import resolve_policy

    resolved = resolve_policy(config.model, run_dir, config.task)
    if isinstance(resolved, Path):
        return resolved
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(resolved, local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"model.path: {resolved!r} is not in the local Hugging Face cache "
                                f"($HF_HOME); fetch it first: huggingface-cli download {resolved}") from None


# ---- engines and their pool ------------------------------------------------------------------------------

def engine_key(model_path: Path, config: Config, pg: PlacementGroup) -> str:
    """What a trial's engines are built from: two trials with equal keys can share them."""
    return json.dumps({"model_path": str(model_path), "placement_group": pg.id.hex(),
                       "learner": learner_worker.built_settings(config),
                       "rollout": rollout_worker.built_settings(config)}, sort_keys=True, default=str)


@dataclass
class Engines:
    """A trial's learner and rollout groups (core.types.Learner and Rollout), and what they were built from."""

    learner: LearnerGroup
    rollout: RolloutGroup
    key: str

    def reset(self, config: Config) -> None:
        """Both as freshly built for `config`: the learner at pi_ref with a fresh optimizer, the engines
        with its seeds and pi_ref's weights."""
        self.learner.reset(config)
        self.rollout.reset(config)
        self.learner.sync_weights_to(self.rollout)

    def end_trial(self) -> None:
        """What lives only as long as a trial goes with it: the collective weight-sync group (the next
        trial on these engines builds its own at its first sync)."""
        self.learner.close_weight_sync()

    def alive(self) -> bool:
        return self.learner.alive() and self.rollout.alive()

    def shutdown(self) -> None:
        self.rollout.shutdown()
        self.learner.shutdown()


def start_engines(model_path: Path, config: Config, pg: PlacementGroup) -> Engines:
    """Learner and rollout groups, started side by side: engine start-up is mostly single-threaded Python
    (model load, vLLM's profiling run, DeepSpeed init), so two of them share two cores well (figures in
    docs/BENCHMARKS.md). If either fails, the other is shut down."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-start") as threads:
        rollout_start = threads.submit(RolloutGroup, model_path, config, pg)
        try:
            learner = LearnerGroup(model_path, config, pg)
        except BaseException:
            if rollout_start.exception() is None:  # waits for it: no actor may outlive the failure
                rollout_start.result().shutdown()
            raise
        try:
            rollout = rollout_start.result()
        except BaseException:
            learner.shutdown()
            raise
    return Engines(learner, rollout, engine_key(model_path, config, pg))


class EnginePool:
    """The engines of this process's last trial, kept for the next trial that can reuse them."""

    def __init__(self):
        self.engines: Engines | None = None

    def acquire(self, model_path: Path, config: Config, pg: PlacementGroup) -> tuple[Engines, bool]:
        """(engines ready for a trial of `config`, whether they were reused)."""
        key = engine_key(model_path, config, pg)
        if self.engines is not None and (self.engines.key != key or not self.engines.alive()):
            self.discard()
        if self.engines is not None:
            try:
                self.engines.reset(config)
            except BaseException:
                self.discard()
                raise
            return self.engines, True
        self.engines = start_engines(model_path, config, pg)
        return self.engines, False

    def release(self) -> None:
        """The trial using the held engines has ended; they stay for the next one."""
        if self.engines is not None:
            self.engines.end_trial()

    def discard(self) -> None:
        """Shut the held engines down (after a failure: their state is unknown)."""
        if self.engines is not None:
            engines, self.engines = self.engines, None
            engines.shutdown()


POOL = EnginePool()  # one per process: a Tune trainable reused across trials keeps its engines here
