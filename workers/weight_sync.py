"""The collective weight sync, driven from the trial's driver (`rollout.weight_sync: collective`).

One process group per trial over learner rank 0 (group rank 0) and every worker of every rollout
engine (ranks 1..W-1, engine by engine, tensor-parallel workers in their engine's order):

    set-up (once)   learner 0: listen on a free port -> metas (HF name, shape, dtype) of the policy
                    learner 0 + every vLLM worker: join the group (gloo, or NCCL when all are on GPUs)
    sync (per step) every learner rank: broadcast_weights (ZeRO-3: gather bucket by bucket; rank 0 sends)
                    every engine: receive_weights -> reload_weights(generator over the buckets)
    close           every member leaves the group; the store's port and the backend's threads go with it

The weights never pass through the driver or the object store: each byte leaves learner rank 0 once
per receiver over the group's transport (TCP for gloo, NVLink/InfiniBand for NCCL). The classes it
drives are `LearnerWorker` and `RolloutWorker` (their `*_weight_sync` and `*_weights` methods) and the
wire protocol in `workers/weight_transfer.py`.

A member that dies or errors fails the sync at once with its name in the error; one that hangs fails
it after `timeout_s` (and every member's own collective also gives up after `timeout_s`, so nothing
waits forever). After a failure the group is unusable: the step raises, and the trial tears it down.
"""
from __future__ import annotations

import time

import ray

from workers.weight_transfer import check_backend

# Per broadcast. 4, 16 and 64 MiB measured the same within noise at 100M parameters on CPU/gloo
# (docs/BENCHMARKS.md, weight sync); NCCL prefers fewer, larger messages.
BUCKET_BYTES = 64 << 20
CLOSE_TIMEOUT_S = 30.0
FAILURE_GRACE_S = 2.0  # after a member fails, how long to wait for the others' errors


class WeightSyncError(RuntimeError):
    """A collective weight sync failed; the message names the member that failed."""


def _node_ip(_actor) -> str:
    """Run in an actor through __ray_call__: the IP its node is reached at."""
    return ray.util.get_node_ip_address()


def _reason(error: BaseException) -> str:
    if isinstance(error, ray.exceptions.RayActorError):
        return "its actor died"
    cause = getattr(error, "cause", None) or error
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def _failures(refs: list, names: dict) -> list[tuple[str, BaseException]]:
    failed = []
    for ref in refs:
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.GetTimeoutError:
            continue
        except Exception as error:
            failed.append((names[ref], error))
    return failed


def wait_members(calls: dict[str, ray.ObjectRef], what: str, timeout_s: float) -> dict[str, object]:
    """Results of {member name: ref}. Raises WeightSyncError soon after a member fails, naming every
    member that failed by then (a dead actor first: the others' errors are usually its consequence),
    and TimeoutError naming the members still silent after timeout_s."""
    names = {ref: name for name, ref in calls.items()}
    pending, deadline = list(calls.values()), time.monotonic() + timeout_s
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            silent = ", ".join(names[r] for r in pending)
            raise TimeoutError(f"collective weight {what}: no answer from {silent} within {timeout_s:.0f} s")
        if not _failures(ready, names):
            continue
        # Give the other members a moment to report, so the message names the root cause.
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=FAILURE_GRACE_S)
        failed = sorted(_failures(list(calls.values()), names),
                        key=lambda f: not isinstance(f[1], ray.exceptions.RayActorError))
        summary = "; ".join(f"{name}: {_reason(error)}" for name, error in failed)
        raise WeightSyncError(f"collective weight {what} failed: {summary}") from failed[0][1]
    return {name: ray.get(ref) for name, ref in calls.items()}


class CollectiveWeightSync:
    """The trial's weight-sync group over `learners` (LearnerWorker actors, rank order) and `rollouts`
    (RolloutWorker actors). Built (joined) on construction; `sync()` once per step; `close()` with the
    trial. `timeout_s` bounds set-up, each sync, and each collective inside the members."""

    def __init__(self, learners: list, rollouts: list, timeout_s: float, bucket_bytes: int = BUCKET_BYTES):
        if not learners or not rollouts:
            raise ValueError(f"collective weight sync needs learners and rollout engines, got {len(learners)} "
                             f"learner and {len(rollouts)} rollout actors")
        self.learners, self.rollouts = list(learners), list(rollouts)
        self.timeout_s, self.bucket_bytes = timeout_s, bucket_bytes
        self.failed: BaseException | None = None
        self.backend, self.world_size, self.total_bytes = "", 0, 0
        self.last_received: dict[str, int] = {}  # engine name -> bytes its worker 0 got in the last sync
        self._joined = False
        try:
            self._open()
        except BaseException as error:
            self.failed = error
            self.close()
            raise

    def _engines(self) -> dict[str, object]:
        return {f"rollout engine {i}": actor for i, actor in enumerate(self.rollouts)}

    def _open(self) -> None:
        lead = self.learners[0]
        devices = wait_members({"learner rank 0": lead.weight_sync_device.remote(),
                                **{n: a.weight_sync_devices.remote() for n, a in self._engines().items()}},
                               "sync set-up", self.timeout_s)
        engine_devices = [devices[name] for name in self._engines()]
        # One backend for the whole group: NCCL only when every member holds a GPU.
        everything = [devices["learner rank 0"]] + [d for engine in engine_devices for d in engine]
        self.backend = "nccl" if all(d == "cuda" for d in everything) else "gloo"
        check_backend(self.backend)
        self.world_size = len(everything)
        host = ray.get(lead.__ray_call__.remote(_node_ip), timeout=self.timeout_s)
        self._joined = True  # from here on members may hold group state that close() must release
        port = ray.get(lead.listen_weight_sync.remote(host, self.timeout_s), timeout=self.timeout_s)
        metas = ray.get(lead.weight_metas.remote(), timeout=self.timeout_s)
        self.total_bytes = sum(m.nbytes for m in metas)
        calls = {"learner rank 0": lead.join_weight_sync.remote(self.world_size, self.backend)}
        offset = 1
        for (name, actor), workers in zip(self._engines().items(), engine_devices):
            calls[name] = actor.open_weight_sync.remote(host, port, offset, self.world_size, self.backend, metas,
                                                        self.bucket_bytes, self.timeout_s)
            offset += len(workers)
        wait_members(calls, "sync set-up", self.timeout_s)

    def sync(self) -> int:
        """Broadcast learner rank 0's full weights to every engine; returns the bytes each engine got."""
        if self.failed is not None:
            raise WeightSyncError(f"collective weight sync is unusable after an earlier failure: {self.failed}")
        calls = {f"learner rank {r}": a.broadcast_weights.remote(self.bucket_bytes)
                 for r, a in enumerate(self.learners)}
        calls.update({name: actor.receive_weights.remote() for name, actor in self._engines().items()})
        try:
            results = wait_members(calls, "sync", self.timeout_s)
        except BaseException as error:
            self.failed = error
            raise
        self.last_received = {name: results[name] for name in self._engines()}
        return results["rollout engine 0"]

    def close(self) -> None:
        """Every member leaves the group; idempotent and best effort (it never raises): dead members are
        skipped, and one stuck in a collective is not waited for beyond CLOSE_TIMEOUT_S (its collective
        gives up after timeout_s, and the trial kills the actors anyway). After a failed sync the members'
        close calls queue behind their stuck collectives, so they get a moment only."""
        if not self._joined:
            return
        self._joined = False
        refs = [self.learners[0].close_weight_sync.remote()] + [a.close_weight_sync.remote() for a in self.rollouts]
        wait_s = FAILURE_GRACE_S if self.failed is not None else min(self.timeout_s, CLOSE_TIMEOUT_S)
        ray.wait(refs, num_returns=len(refs), timeout=wait_s)
