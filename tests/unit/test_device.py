"""An actor's engine settings come from the resources it was given, never from the driver's machine.

These run the GPU actors' code path on this CPU machine: `actor_device(cpus, gpus=1)` is the same code a
GPU actor runs, only the CUDA calls (`check`, `torch_device`) need a GPU.
"""
from __future__ import annotations

import os

import pytest

from core.config import Config, ConfigError, RolloutConfig
from workers import device, environment

CPU_ENGINE = {"DS_ACCELERATOR": "cpu", "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture()
def gpu_less_driver(monkeypatch):
    """This process as a driver on a GPU-less head node: configure() put CPU engine settings in its env."""
    for key, value in environment.engine_env(cuda=False).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    monkeypatch.delenv(device.ACTOR_GPUS_ENV, raising=False)
    monkeypatch.delenv(device.ACTOR_CPUS_ENV, raising=False)


def test_gpu_actor_gets_cuda_settings_from_a_gpu_less_driver(gpu_less_driver):
    env = device.runtime_env(4, 1, environment.actor_env_vars())["env_vars"]
    assert env["DS_ACCELERATOR"] == env["VLLM_TARGET_DEVICE"] == "cuda"
    assert "VLLM_CPU_KVCACHE_SPACE" not in env
    assert "CUDA_VISIBLE_DEVICES" not in env  # Ray sets it to the actor's own GPU
    assert env["OMP_NUM_THREADS"] == "4" and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert (env[device.ACTOR_CPUS_ENV], env[device.ACTOR_GPUS_ENV]) == ("4", "1")
    assert env["HF_HOME"] == os.environ["HF_HOME"]  # the run's caches are shared


def test_cpu_actor_keeps_todays_cpu_settings_and_hides_the_nodes_gpus(gpu_less_driver):
    env = device.runtime_env(2, 0, environment.actor_env_vars())["env_vars"]
    assert env["DS_ACCELERATOR"] == env["VLLM_TARGET_DEVICE"] == "cpu"
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["OMP_NUM_THREADS"] == "2"


def test_the_drivers_engine_settings_never_reach_workers(gpu_less_driver):
    shared = environment.actor_env_vars()  # also the job-level runtime_env of launch.connect_ray
    assert not set(CPU_ENGINE) & set(shared)
    assert {"HF_HOME", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS"} <= set(shared)


def test_actor_options_carry_the_resources_and_their_runtime_env(gpu_less_driver):
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    from workers.actors import actor_options

    options = actor_options(PlacementGroup(PlacementGroupID.from_random()), 2, 4.0, 1.0)
    assert (options["num_cpus"], options["num_gpus"]) == (4.0, 1.0)
    assert options["scheduling_strategy"].placement_group_bundle_index == 2
    assert options["runtime_env"] == device.runtime_env(4.0, 1.0, environment.actor_env_vars())


@pytest.mark.parametrize("gpus, requested, backend", [
    (1, "auto", "nccl"), (0, "auto", "gloo"), (1, "gloo", "gloo"), (0, "gloo", "gloo"), (0.5, "nccl", "nccl")])
def test_dist_backend_follows_the_actors_device(gpus, requested, backend):
    assert device.actor_device(1, gpus).dist_backend(requested) == backend


def test_nccl_without_a_gpu_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="learner.backend: 'nccl' needs a CUDA device"):
        device.actor_device(4, 0).dist_backend("nccl")
    with pytest.raises(ValueError, match="learner.backend: unknown value 'mpi'"):
        device.actor_device(4, 1).dist_backend("mpi")


def test_vllm_settings_per_device():
    rollout = RolloutConfig(gpu_memory_utilization=0.6, tensor_parallel_size=1, kv_cache_space_gib=3)
    args, env = device.actor_device(4, 1).vllm_settings(rollout)
    assert args == {"enforce_eager": False, "gpu_memory_utilization": 0.6, "tensor_parallel_size": 1} and env == {}
    args, env = device.actor_device(1, 0).vllm_settings(rollout)
    assert args == {"enforce_eager": True} and env == {"VLLM_CPU_KVCACHE_SPACE": "3"}


def test_inside_an_actor_the_device_comes_from_its_runtime_env(gpu_less_driver, monkeypatch):
    """A GPU actor whose raylet inherited a CPU driver's settings: enter() leaves CUDA settings only."""
    for key, value in device.actor_device(4, 1).env_vars().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # inherited, not overridable by a runtime_env
    actor = device.this_actor()
    assert (actor.cuda, actor.cpus, actor.gpus) == (True, 4.0, 1.0)
    actor.enter()
    assert os.environ["DS_ACCELERATOR"] == os.environ["VLLM_TARGET_DEVICE"] == "cuda"
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    with pytest.raises(RuntimeError, match=r"given 1 GPU\(s\) but torch .* sees no CUDA device"):
        actor.check("bfloat16")  # this machine's torch has no CUDA: the actor refuses before any engine starts


def test_in_process_engines_use_this_machines_device(gpu_less_driver):
    import torch

    actor = device.this_actor()
    assert actor.cuda == torch.cuda.is_available()
    actor.enter()
    assert device.ACTOR_GPUS_ENV not in os.environ  # entering does not pretend to be an actor


def good_gpu_report(**changes) -> dict:
    report = {"node": "10.0.0.2", "device": "cuda", "cpus": 4.0, "gpus": 1.0, "ray_gpu_ids": ["3"], "backend": "nccl",
              "env": {"CUDA_VISIBLE_DEVICES": "3", "DS_ACCELERATOR": "cuda", "VLLM_TARGET_DEVICE": "cuda",
                      "VLLM_CPU_KVCACHE_SPACE": None, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "4"},
              "nvidia_device_files": True, "torch": "2.13.0 (CUDA 13.0)", "vllm": "vllm 0.32.0"}
    env = {**report["env"], **changes.pop("env", {})}
    return {**report, **changes, "env": env}


def test_probe_reports_are_checked_against_the_reserved_device():
    assert device.problems(good_gpu_report(), "learner") == []
    leaked = device.problems(good_gpu_report(env={"DS_ACCELERATOR": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}), "rollout")
    assert leaked == ["DS_ACCELERATOR='cpu', expected 'cuda'", "VLLM_CPU_KVCACHE_SPACE is set on a GPU actor"]
    cpu_build = device.problems(good_gpu_report(torch="2.13.0+cpu (no CUDA)", vllm="vllm-cpu 0.32.0"), "rollout")
    assert len(cpu_build) == 2 and "install klrl[gpu]" in cpu_build[0]
    hidden = device.problems(good_gpu_report(env={"CUDA_VISIBLE_DEVICES": ""}), "learner")
    assert hidden == ["CUDA_VISIBLE_DEVICES='' shows fewer than the 1 GPU(s) reserved"]
    # Logical GPUs (no NVIDIA device files): the engine builds are not judged.
    assert device.problems(good_gpu_report(nvidia_device_files=False, torch="2.13.0+cpu (no CUDA)"), "learner") == []


def test_learner_backend_defaults_to_auto_and_sleep_mode_is_gone():
    assert Config().learner.backend == "auto"
    with pytest.raises(ConfigError, match=r"^rollout.enable_sleep_mode: removed: a learner and a rollout engine "
                                          r"never share a GPU"):
        Config.from_dict({"rollout": {"enable_sleep_mode": True}})


def test_engines_given_a_gpu_take_it_from_their_actor_not_from_torch(monkeypatch, tmp_path):
    """A learner and a rollout actor given a GPU on a node whose torch has no CUDA (this machine) refuse
    before any engine loads, instead of silently running on the CPU as torch.cuda.is_available() would."""
    from workers.learner import LearnerWorker
    from workers.rollout import RolloutWorker

    for key, value in device.actor_device(1, 1).env_vars().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # restored after enter() drops it
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match=r"given 1 GPU\(s\) but torch .* sees no CUDA device"):
        LearnerWorker(tmp_path, Config())
    with pytest.raises(RuntimeError, match=r"given 1 GPU\(s\) but torch .* sees no CUDA device"):
        RolloutWorker(tmp_path, RolloutConfig())
