"""The one place klrl wraps workers with `ray.remote`: placement-group bundles, rank wiring, fan-out.

Layout of a trial's resources (`bundles_for`): an empty head bundle for the Tune trainable, then one
bundle per learner actor, then one per rollout actor. Ray Tune drops an all-zero head bundle
(`ray.air.execution.resources.request.ResourceRequest` sets `head_bundle_is_empty` and pops it): the
trainable then holds no reserved CPU and the trial's placement group holds only the worker bundles,
so inside the trainable learner i sits in bundle i and rollout j in bundle num_learners + j. The
driver's own work (rewards, metrics) is light next to the engines, so a trial fits in 2 CPUs:
learner 1 + rollout 1. `create_placement_group` builds the same worker bundles outside Tune (tests,
benchmarks).

Every call to an actor goes through `_get` with a timeout, so a dead or hung actor raises on the driver
instead of blocking it; a group kills its actors when its construction fails.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from core.config import Config
from core.types import RolloutBatch, TokenScores, TrainBatch
from workers import environment
from workers.learner import SUMMED_METRICS, LearnerWorker, check_model_dir, free_port
from workers.rollout import RolloutWorker
from workers.weight_sync import CollectiveWeightSync

CALL_TIMEOUT_S = 900.0  # longest a single actor call may take (a slow CPU rollout or update)
START_TIMEOUT_S = 600.0  # actor start: model load + DeepSpeed init (JIT-compiles a comm op on first use)
PORT_ATTEMPTS = 3


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


def learner_bundle(config: Config, rank: int) -> int:
    return rank


def rollout_bundle(config: Config, index: int) -> int:
    return config.learner.num_workers + index


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


def _get(refs, what: str, timeout_s: float):
    """ray.get with a timeout that names the call that did not answer."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"{what}: no answer within {timeout_s:.0f} s (actor hung or too slow)") from None


def _get_failfast(refs: list, what: str, timeout_s: float) -> list:
    """Like _get on a list, but raises the first failure as soon as it arrives: a rank that died in
    its constructor would otherwise leave the driver waiting on the ranks stuck in the rendezvous."""
    pending, deadline = list(refs), time.monotonic() + timeout_s
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"{what}: no answer within {timeout_s:.0f} s (actor hung or too slow)")
        ray.get(ready)  # raises the actor's error
    return ray.get(refs)


def _options(pg: PlacementGroup, bundle: int, cpus: float, gpus: float) -> dict:
    return dict(num_cpus=cpus, num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                     placement_group_bundle_index=bundle),
                # One math thread per reserved CPU: the driver's OMP_NUM_THREADS (all cores) in every
                # actor oversubscribes the node, and spinning OpenMP threads then slow all of them.
                runtime_env={"env_vars": {**environment.actor_env_vars(), "OMP_NUM_THREADS": str(max(1, int(cpus)))}})


@ray.remote
def _master_address() -> tuple[str, int]:
    """Rank 0's node IP and a free port there (run in rank 0's bundle, so on rank 0's node)."""
    return ray.util.get_node_ip_address(), free_port()


def _vocab_size(folder: Path) -> int | None:
    return json.loads((folder / "config.json").read_text()).get("vocab_size")


class LearnerGroup:
    """num_workers data-parallel LearnerWorker actors; splits batches by rank, gathers results."""

    def __init__(self, model_path: str | os.PathLike, config: Config, pg: PlacementGroup, first_bundle: int = 0,
                 reference_path: str | os.PathLike | None = None, timeout_s: float = CALL_TIMEOUT_S):
        self.config, self.timeout_s, self.world_size = config, timeout_s, config.learner.num_workers
        self.actors: list = []
        self._weight_sync: CollectiveWeightSync | None = None  # rollout.weight_sync=collective, built lazily
        self._weight_sync_target = None  # the RolloutGroup that group serves
        # Cheap driver-side checks first: a rank that dies in its constructor would leave the others
        # waiting in torch.distributed's rendezvous.
        policy = check_model_dir(model_path, "model_path")
        reference = check_model_dir(reference_path or model_path, "reference_path")
        if _vocab_size(policy) != _vocab_size(reference):
            raise ValueError(f"reference_path: vocabulary mismatch, policy '{policy}' has vocab_size "
                             f"{_vocab_size(policy)} but reference '{reference}' has {_vocab_size(reference)}")
        bundles = [first_bundle + learner_bundle(config, r) for r in range(self.world_size)]
        for attempt in range(PORT_ATTEMPTS):
            try:
                self._start(policy, reference, pg, bundles)
                return
            except Exception as error:
                self.shutdown()
                # The free port rank 0 was given can be taken by another process before it binds it.
                if "EADDRINUSE" not in str(error) or attempt == PORT_ATTEMPTS - 1:
                    raise

    def _start(self, policy: Path, reference: Path, pg: PlacementGroup, bundles: list[int]) -> None:
        lc = self.config.learner
        addr, port = _get(_master_address.options(**_options(pg, bundles[0], 0, 0)).remote(),
                          "learner master address", START_TIMEOUT_S)
        actor = ray.remote(LearnerWorker)
        self.actors = [actor.options(**_options(pg, bundles[r], lc.cpus_per_worker, lc.gpus_per_worker)).remote(
            str(policy), self.config, r, self.world_size, addr, port, str(reference))
            for r in range(self.world_size)]
        _get_failfast([a.ping.remote() for a in self.actors], "learner start", START_TIMEOUT_S)

    def _check_divides(self, rows: int) -> None:
        if rows % self.world_size:
            raise ValueError(f"batch of {rows} rows does not split over learner.num_workers={self.world_size}; "
                             "make task.prompts_per_step * rollout.n_samples a multiple of it")

    def score(self, batch: RolloutBatch) -> TokenScores:
        """TokenScores (B, T) for the whole batch, each rank scoring its contiguous shard."""
        self._check_divides(batch.batch_size)
        refs = [a.score.remote(batch.shard(r, self.world_size)) for r, a in enumerate(self.actors)]
        return TokenScores.concat(_get(refs, "learner score", self.timeout_s))

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """One PPO update on all ranks; metrics averaged over ranks (token/sequence counts summed)."""
        self._check_divides(batch.rollout.batch_size)
        refs = [a.update.remote(batch.shard(r, self.world_size)) for r, a in enumerate(self.actors)]
        per_rank = _get(refs, "learner update", self.timeout_s)
        return {k: float(sum(m[k] for m in per_rank)) if k in SUMMED_METRICS
                else float(np.mean([m[k] for m in per_rank])) for k in per_rank[0]}

    def export_weights_ref(self) -> ray.ObjectRef:
        """ObjectRef to rank 0's full weights (all ranks take part: ZeRO-3 gathers are collective).

        Handing the ref straight to RolloutGroup.update_weights keeps the weights out of the driver.
        """
        refs = [a.export_weights.remote() for a in self.actors]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            raise TimeoutError(f"learner export_weights: no answer within {self.timeout_s:.0f} s")
        return refs[0]

    def export_weights(self):
        """Rank 0's full weights as [(HF name, CPU tensor)]."""
        return _get(self.export_weights_ref(), "learner export_weights", self.timeout_s)

    def sync_weights_to(self, rollout: "RolloutGroup") -> None:
        """Load rank 0's current weights into every engine of `rollout`, by config.rollout.weight_sync:
        'object_store' (export -> Ray object store -> each engine's update_weights) or 'collective'
        (the trial's process group, workers/weight_sync.py: built on the first call, closed by shutdown)."""
        if self.config.rollout.weight_sync == "object_store":
            rollout.update_weights(self.export_weights_ref())
            return
        if self._weight_sync_target is not rollout:
            self.close_weight_sync()
            self._weight_sync = CollectiveWeightSync(self.actors, rollout.actors, self.timeout_s)
            self._weight_sync_target = rollout
        self._weight_sync.sync()

    def close_weight_sync(self) -> None:
        if self._weight_sync is not None:
            self._weight_sync.close()
        self._weight_sync = self._weight_sync_target = None

    def save_checkpoint(self, directory: str | os.PathLike) -> None:
        _get([a.save_checkpoint.remote(str(directory)) for a in self.actors], "learner save", self.timeout_s)

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        _get([a.load_checkpoint.remote(str(directory)) for a in self.actors], "learner load", self.timeout_s)

    def shutdown(self) -> None:
        self.close_weight_sync()
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


class RolloutGroup:
    """num_workers vLLM RolloutWorker actors; prompts split across them, batches concatenated."""

    def __init__(self, model_path: str | os.PathLike, config: Config, pg: PlacementGroup,
                 first_bundle: int | None = None, timeout_s: float = CALL_TIMEOUT_S):
        rc = config.rollout
        self.timeout_s = timeout_s
        folder = check_model_dir(model_path, "model_path")
        first = rollout_bundle(config, 0) if first_bundle is None else first_bundle
        actor = ray.remote(RolloutWorker)
        self.actors = [actor.options(**_options(pg, first + i, rc.cpus_per_worker, rc.gpus_per_worker)).remote(
            str(folder), rc, config.model.dtype, config.run.seed + i) for i in range(rc.num_workers)]
        try:
            _get_failfast([a.__ray_ready__.remote() for a in self.actors], "rollout start", START_TIMEOUT_S)
        except Exception:
            self.shutdown()
            raise

    def generate(self, prompts: list[str], n: int, seed: int) -> RolloutBatch:
        """n samples per prompt; worker i gets the i-th contiguous slice of prompts and seed W*seed + i.

        W*seed + i (W workers), not seed + i: callers pass consecutive seeds for consecutive steps, and
        with seed + i worker 1 at step k would replay worker 0's sample stream of step k + 1.
        """
        chunks = [c.tolist() for c in np.array_split(np.arange(len(prompts)), len(self.actors)) if len(c)]
        refs = [a.generate.remote([prompts[j] for j in idx], n, len(self.actors) * seed + i)
                for i, (a, idx) in enumerate(zip(self.actors, chunks))]
        return RolloutBatch.concat(_get(refs, "rollout generate", self.timeout_s))

    def update_weights(self, weights) -> None:
        """Load new weights into every engine: a [(name, tensor)] list (put into the object store once)
        or an ObjectRef to one (from LearnerGroup.export_weights_ref)."""
        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        _get([a.update_weights.remote(ref) for a in self.actors], "rollout update_weights", self.timeout_s)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
