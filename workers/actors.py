"""The one place klrl wraps workers with `ray.remote`: the learner and rollout groups a trial talks to.

`LearnerGroup` and `RolloutGroup` implement the `Learner` and `Rollout` protocols of core/types.py, so
the trial loop sees plain method calls and never a Ray object reference. Each group starts its actors in
given bundles of a placement group (workers/engines.py lays the bundles out and keeps engines for reuse),
splits batches over its actors and gathers the results.

Every call to an actor goes through `_get` with a timeout, so a dead or hung actor raises on the caller
instead of blocking it; a group kills its actors when its construction fails.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from core.config import Config
from core.types import RolloutBatch, TokenScores, TrainBatch
from tasks.policy import check_model_folder
from workers import device, environment
from workers.learner import SUMMED_METRICS, LearnerWorker, check_same_vocab, free_port
from workers.rollout import RolloutWorker
from workers.weight_sync import CollectiveWeightSync

CALL_TIMEOUT_S = 900.0  # longest a single actor call may take (a slow CPU rollout or update)
START_TIMEOUT_S = 600.0  # actor start: model load + DeepSpeed init (JIT-compiles a comm op on first use)
PING_TIMEOUT_S = 30.0
PORT_ATTEMPTS = 3


def actor_options(pg: PlacementGroup, bundle: int, cpus: float, gpus: float) -> dict:
    """Ray options of an actor in bundle `bundle` of pg: its resources, and the runtime_env that
    workers/device.py derives from those resources (never from this driver's machine)."""
    return dict(num_cpus=cpus, num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                     placement_group_bundle_index=bundle),
                runtime_env=device.runtime_env(cpus, gpus, environment.actor_env_vars()))


def _placed(remote, pg: PlacementGroup, bundle: int, cpus: float, gpus: float):
    """`remote` (a ray.remote class or function) placed in the bundle; every klrl actor starts here."""
    return remote.options(**actor_options(pg, bundle, cpus, gpus))


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


def _alive(refs: list) -> bool:
    try:
        ray.get(refs, timeout=PING_TIMEOUT_S)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        return False
    return True


@ray.remote
def _master_address() -> tuple[str, int]:
    """Rank 0's node IP and a free port there (run in rank 0's bundle, so on rank 0's node)."""
    return ray.util.get_node_ip_address(), free_port()


class LearnerGroup:
    """num_workers data-parallel LearnerWorker actors; splits batches by rank, gathers results.

    Right after start the group snapshots the fresh learners (DeepSpeed checkpoint under the run dir's
    tmp/, a filesystem every rank shares) so that `reset` can return them to it for the next trial.
    """

    def __init__(self, model_path: str | os.PathLike, config: Config, pg: PlacementGroup, first_bundle: int = 0,
                 reference_path: str | os.PathLike | None = None, timeout_s: float = CALL_TIMEOUT_S):
        self.config, self.timeout_s, self.world_size = config, timeout_s, config.learner.num_workers
        self.actors: list = []
        # rollout.weight_sync=collective: this trial's group and the RolloutGroup it serves
        self._weight_sync: CollectiveWeightSync | None = None
        self._weight_sync_target: RolloutGroup | None = None
        self.fresh = environment.run_dir() / "tmp" / f"learner-fresh-{uuid.uuid4().hex[:12]}"
        # Cheap driver-side checks first: a rank that dies in its constructor would leave the others
        # waiting in torch.distributed's rendezvous.
        weight_sync(config)
        policy = check_model_folder(model_path, "model_path", tokenizer=False)
        reference = check_model_folder(reference_path or model_path, "reference_path", tokenizer=False)
        check_same_vocab(policy, reference)
        bundles = [first_bundle + rank for rank in range(self.world_size)]
        for attempt in range(PORT_ATTEMPTS):
            try:
                self._start(policy, reference, pg, bundles)
                break
            except Exception as error:
                self.shutdown()
                # The free port rank 0 was given can be taken by another process before it binds it.
                if "EADDRINUSE" not in str(error) or attempt == PORT_ATTEMPTS - 1:
                    raise
        try:
            self._call("snapshot", "learner snapshot", str(self.fresh))
        except BaseException:
            self.shutdown()
            raise

    def _start(self, policy: Path, reference: Path, pg: PlacementGroup, bundles: list[int]) -> None:
        lc = self.config.learner
        addr, port = _get(_placed(_master_address, pg, bundles[0], 0, 0).remote(), "learner master address",
                          START_TIMEOUT_S)
        actor = ray.remote(LearnerWorker)
        self.actors = [_placed(actor, pg, bundles[r], lc.cpus_per_worker, lc.gpus_per_worker).remote(
            str(policy), self.config, r, self.world_size, addr, port, str(reference))
            for r in range(self.world_size)]
        _get_failfast([a.ping.remote() for a in self.actors], "learner start", START_TIMEOUT_S)

    def _call(self, method: str, what: str, *args) -> list:
        """The same call on every rank (collective ones must reach all ranks), results in rank order."""
        return _get([getattr(a, method).remote(*args) for a in self.actors], what, self.timeout_s)

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
        self._check_divides(batch.batch_size)
        refs = [a.update.remote(batch.shard(r, self.world_size)) for r, a in enumerate(self.actors)]
        per_rank = _get(refs, "learner update", self.timeout_s)
        return {k: float(sum(m[k] for m in per_rank)) if k in SUMMED_METRICS
                else float(np.mean([m[k] for m in per_rank])) for k in per_rank[0]}

    def sync_weights_to(self, rollout: RolloutGroup) -> None:
        """Load the policy's current weights into every engine of `rollout` (rollout.weight_sync's way)."""
        weight_sync(self.config)(self, rollout)

    def weight_sync_group(self, rollout: RolloutGroup) -> CollectiveWeightSync:
        """The trial's collective weight-sync group to `rollout`'s engines, built on first use."""
        if self._weight_sync is None or self._weight_sync_target is not rollout:
            self.close_weight_sync()
            self._weight_sync = CollectiveWeightSync(self.actors, rollout.actors, self.timeout_s)
            self._weight_sync_target = rollout
        return self._weight_sync

    def close_weight_sync(self) -> None:
        """Tear the trial's weight-sync group down, if there is one (its port and its threads on every
        member go with it): at the end of every trial, before a reset and at shutdown."""
        if self._weight_sync is not None:
            group, self._weight_sync, self._weight_sync_target = self._weight_sync, None, None
            group.close()

    def export_weights_ref(self) -> ray.ObjectRef:
        """ObjectRef to rank 0's full weights (all ranks take part: ZeRO-3 gathers are collective).

        Handing the ref straight to RolloutGroup.update_weights keeps the weights out of the caller.
        """
        refs = [a.export_weights.remote() for a in self.actors]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            raise TimeoutError(f"learner export_weights: no answer within {self.timeout_s:.0f} s")
        return refs[0]

    def export_weights(self):
        """Rank 0's full weights as [(HF name, CPU tensor)]."""
        return _get(self.export_weights_ref(), "learner export_weights", self.timeout_s)

    def save_checkpoint(self, directory: str | os.PathLike) -> None:
        self._call("save_checkpoint", "learner save", str(directory))

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        self._call("load_checkpoint", "learner load", str(directory))

    def reset(self, config: Config) -> None:
        """Every rank back to its fresh snapshot, with this trial's seeds and call-time settings. A new
        trial gets a new weight-sync group (built at its first sync)."""
        weight_sync(config)
        self.close_weight_sync()
        self._call("reset", "learner reset", config)
        self.config = config

    def alive(self) -> bool:
        return bool(self.actors) and _alive([a.ping.remote() for a in self.actors])

    def shutdown(self) -> None:
        self.close_weight_sync()
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        shutil.rmtree(self.fresh, ignore_errors=True)


class RolloutGroup:
    """num_workers vLLM RolloutWorker actors; prompts split across them, batches concatenated."""

    def __init__(self, model_path: str | os.PathLike, config: Config, pg: PlacementGroup,
                 first_bundle: int | None = None, timeout_s: float = CALL_TIMEOUT_S):
        """Engine i in bundle first_bundle + i (default: right after the learners', as bundles_for lays out)."""
        rc = config.rollout
        first_bundle = config.learner.num_workers if first_bundle is None else first_bundle
        self.timeout_s = timeout_s
        folder = check_model_folder(model_path, "model_path")
        actor = ray.remote(RolloutWorker)
        self.actors = [_placed(actor, pg, first_bundle + i, rc.cpus_per_worker, rc.gpus_per_worker).remote(
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

    def reset(self, config: Config) -> None:
        """Every engine to this trial's sampling settings and seeds (engine i: run.seed + i, as at
        construction), prefix cache emptied; the weights are pushed by the learner afterwards."""
        _get([a.reset.remote(config.rollout, config.run.seed + i) for i, a in enumerate(self.actors)],
             "rollout reset", self.timeout_s)

    def alive(self) -> bool:
        return bool(self.actors) and _alive([a.__ray_ready__.remote() for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


# ---- weight sync: one function per rollout.weight_sync -------------------------------------------------

def _sync_through_object_store(learner: LearnerGroup, rollout: RolloutGroup) -> None:
    """Rank 0's weights go into Ray's object store once; every engine reads them from there."""
    rollout.update_weights(learner.export_weights_ref())


def _sync_through_group(learner: LearnerGroup, rollout: RolloutGroup) -> None:
    """Learner rank 0 broadcasts to every engine over the trial's process group (workers/weight_sync.py)."""
    learner.weight_sync_group(rollout).sync()


# The dispatch point: config.rollout.weight_sync -> how learner weights reach the engines.
WEIGHT_SYNCS = {"object_store": _sync_through_object_store, "collective": _sync_through_group}


def weight_sync(config: Config):
    """The function that syncs weights for config.rollout.weight_sync; a clear error for an unknown one."""
    name = config.rollout.weight_sync
    if name not in WEIGHT_SYNCS:
        raise ValueError(f"rollout.weight_sync: unknown value {name!r}; allowed: {sorted(WEIGHT_SYNCS)}")
    return WEIGHT_SYNCS[name]


class DeviceProbe:
    """Stands where a learner or rollout actor would, with the same Ray options, and reports the device
    it was given as the engines would see it (after `enter`, as they do): no engine, model or CUDA call."""

    def describe(self, backend: str) -> dict:
        device.this_actor().enter()
        return device.describe(backend)


def probe_devices(config: Config, pg: PlacementGroup,
                  timeout_s: float = START_TIMEOUT_S) -> list[tuple[str, int, dict]]:
    """(role, index, report) for a probe in every learner and rollout bundle of pg (bundles_for's layout:
    learner r in bundle r, rollout i after the learners), each started with the options the real actor
    would get; the probes are gone when this returns."""
    lc, rc = config.learner, config.rollout
    slots = ([("learner", r, r, lc) for r in range(lc.num_workers)]
             + [("rollout", i, lc.num_workers + i, rc) for i in range(rc.num_workers)])
    probe = ray.remote(DeviceProbe)
    actors = [_placed(probe, pg, bundle, section.cpus_per_worker, section.gpus_per_worker).remote()
              for _, _, bundle, section in slots]
    try:
        reports = _get_failfast([a.describe.remote(lc.backend) for a in actors], "device probe", timeout_s)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
    return [(role, index, report) for (role, index, _, _), report in zip(slots, reports)]
