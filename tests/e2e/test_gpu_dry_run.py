"""The GPU launch path on a CPU machine: `klrl validate SEED --placement` against a Ray head with logical GPUs.

`ray start --head --num-gpus=2` declares two GPUs that do not exist. The dry run then does everything a
real launch of the seed study does before the first model load: the GPU refusal, Tune's placement group
of `bundles_for`, and a probe actor in every learner/rollout bundle with the real actors' options. The
probes report what the engines would see; no CUDA call runs. The head is started from this test
process's environment, which holds the CPU engine settings of a GPU-less driver (tests/conftest.py
configures them), so its raylet and every worker inherit them: the worst case for a leak.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import uuid
from pathlib import Path

import pytest

from e2e_helpers import kill_head, klrl, processes_under, start_ray_head
from workers import environment

SEED = "search_spaces/seed_palindrome_r1_1p5b.yaml"
# One learner and one rollout actor of 1 GPU + 1 CPU each: the seed study shrunk to fit 2 logical GPUs.
SHRINK = ("--set", "learner.num_workers=1", "--set", "rollout.num_workers=1",
          "--set", "learner.cpus_per_worker=1", "--set", "rollout.cpus_per_worker=1")


@pytest.fixture(scope="module")
def gpu_head(run_dir):
    """(address, env) of a local Ray head with 2 logical GPUs and 2 CPUs, torn down by its own pids."""
    root = Path(run_dir) / "e2e" / uuid.uuid4().hex[:8]  # short: Ray's socket paths (e2e_helpers.py)
    temp_dir = environment.ray_temp_dir(root)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    assert env.get("DS_ACCELERATOR") == "cpu", "the driver must carry CPU engine settings for this test to bite"
    start, gcs, _ = start_ray_head(temp_dir, env, "--num-gpus", "2", "--num-cpus", "2")
    try:
        assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
        yield f"127.0.0.1:{gcs}", env
    finally:
        kill_head(str(temp_dir))
        assert not processes_under(str(temp_dir))
        shutil.rmtree(root, ignore_errors=True)


def actor_lines(stdout: str) -> dict[str, dict[str, str]]:
    """{'learner 0': {'device': 'cuda', 'DS_ACCELERATOR': 'cuda', ...}} from the dry run's report lines."""
    out = {}
    for match in re.finditer(r"^  (learner|rollout) (\d+)  node \S+  (\w+)  (.*)$", stdout, re.MULTILINE):
        fields = dict(re.findall(r"(\w+)=('[^']*'|\S+)", match.group(4)))
        out[f"{match.group(1)} {match.group(2)}"] = {"device": match.group(3), **fields}
    return out


def test_seed_study_places_cuda_actors_on_logical_gpus(gpu_head):
    address, env = gpu_head
    result = klrl("validate", SEED, *SHRINK, "--placement", "--address", address, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert "placement group [{'CPU': 1.0, 'GPU': 1.0}, {'CPU': 1.0, 'GPU': 1.0}] (PACK);" in out
    actors = actor_lines(out)
    assert set(actors) == {"learner 0", "rollout 0"}, out
    for name, fields in actors.items():
        assert fields["device"] == "cuda" and fields["gpus"] == "1", (name, fields)
        assert fields["DS_ACCELERATOR"] == fields["VLLM_TARGET_DEVICE"] == "cuda", (name, fields)
        assert fields["VLLM_CPU_KVCACHE_SPACE"] == "None", (name, fields)  # the raylet's leak was dropped
        assert fields["OMP_NUM_THREADS"] == "1", (name, fields)
    # Ray gave each actor its own logical GPU.
    visible = {actors[n]["CUDA_VISIBLE_DEVICES"] for n in actors}
    assert visible == {"'0'", "'1'"}, actors
    assert actors["learner 0"]["backend"] == "nccl"
    assert "GPUs are logical" in out and "placement dry run passed" in out


def test_more_gpus_than_the_cluster_has_is_refused_naming_the_fields(gpu_head):
    address, env = gpu_head
    result = klrl("validate", SEED, "--placement", "--address", address, env=env, timeout=120)
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    assert ("klrl: error: learner.gpus_per_worker=1 (x2 learners), rollout.gpus_per_worker=1 (x2 rollouts): "
            f"a trial asks for 4 GPU(s) but the Ray cluster at {address} has 2 and no autoscaler") in result.stderr
    assert "placement group" not in result.stdout  # refused before anything was placed


def test_gpu_study_on_a_gpu_less_local_ray_is_refused(short_run_dir):
    """No --address: klrl starts a local Ray on this GPU-less machine, which no autoscaler can grow."""
    result = klrl("validate", SEED, *SHRINK, "--placement", "--run-dir", str(short_run_dir / "study"), timeout=120)
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    assert ("klrl: error: learner.gpus_per_worker=1 (x1 learners), rollout.gpus_per_worker=1 (x1 rollouts): "
            "a trial asks for 2 GPU(s) but the Ray cluster started here has 0 and no autoscaler") in result.stderr


if os.environ.get("KLRL_SKIP_E2E"):  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="KLRL_SKIP_E2E is set")
