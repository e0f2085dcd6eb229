"""Process environment for every klrl process: caches inside the run directory, this process's engines.

Called first by the CLI, benchmarks, each actor and the test session, before torch/vLLM/DeepSpeed/Ray read
their environment. Only sets variables the user has not set, so a cluster's own settings win.

Actors get the cache variables (`actor_env_vars`) but never this process's engine settings: an actor's
engine settings come from the resources it was given (workers/device.py), since the driver usually
runs on a GPU-less head node while its actors hold GPUs.

Nothing a study writes lands outside the run directory: besides the named caches, TMPDIR points into it,
because several libraries write to `tempfile.gettempdir()` and never clean up: vLLM's engine rendezvous
file (`vllm_dist_<uuid>`, vllm.utils.network_utils.get_file_store_init_method), MLflow's sqlite
initialisation lock (`db_init_lock-<hash>`, mlflow.store.db.utils), torch inductor's default cache
(`torchinductor_<user>`), Ray's checkpoint lock files (`_ray_lockfiles`) and Python's multiprocessing
(`pymp-*`). The one exception is the short link to the Ray temp dir (see ray_temp_dir).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

RUN_DIR_ENV = "KLRL_RUN_DIR"


def run_dir(default: str | os.PathLike = "runs") -> Path:
    """The run directory: $KLRL_RUN_DIR if set, else `default` (resolved to an absolute path)."""
    return Path(os.environ.get(RUN_DIR_ENV) or default).resolve()


def cache_env(root: Path) -> dict[str, str]:
    """Environment variables that keep every cache and temp dir under root/cache (never in $HOME)."""
    cache = root / "cache"
    return {
        RUN_DIR_ENV: str(root),
        "HF_HOME": str(cache / "hf"),
        "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "MPLCONFIGDIR": str(cache / "matplotlib"),
        "XDG_CACHE_HOME": str(cache / "xdg"),
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "VLLM_CONFIG_ROOT": str(cache / "vllm_config"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        # MLflow reads DO_NOT_TRACK only as "true"; without this it writes ~/.config/mlflow/telemetry.json.
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "NUMBA_CACHE_DIR": str(cache / "numba"),
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_TRACKING_DIR": str(root / "mlruns"),
        "TOKENIZERS_PARALLELISM": "false",
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor"),
        "TMPDIR": str(cache / "tmp"),
    }


def engine_env(cuda: bool) -> dict[str, str]:
    """Settings for engines built in this process (tests, benchmarks): vLLM in-process; on CPU,
    DeepSpeed's CPU accelerator, vLLM's CPU platform and a 1 GiB KV cache. Never shipped to actors."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if not cuda:
        env.update({"DS_ACCELERATOR": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"})
    return env


def configure(root: str | os.PathLike | None = None, cuda: bool | None = None) -> Path:
    """Set (without overriding) klrl's process environment; returns the resolved run directory.

    `cuda=None` detects a GPU of *this* machine from CUDA_VISIBLE_DEVICES/nvidia device files without
    importing torch, so this can run before torch is imported.
    """
    root_path = Path(root).resolve() if root is not None else run_dir()
    if cuda is None:
        cuda = Path("/dev/nvidia0").exists() and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != ""
    for key, value in {**cache_env(root_path), **engine_env(cuda)}.items():
        os.environ.setdefault(key, value)
    for key in ("HF_HOME", "TORCH_EXTENSIONS_DIR", "MPLCONFIGDIR", "XDG_CACHE_HOME", "VLLM_CACHE_ROOT", "TMPDIR"):
        Path(os.environ[key]).mkdir(parents=True, exist_ok=True)  # tempfile ignores a TMPDIR that is missing
    tempfile.tempdir = None  # gettempdir() caches its first answer; recompute it from TMPDIR
    # vLLM and DeepSpeed drop torch to one thread unless told otherwise.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1))))
    return root_path


# Ray binds unix sockets at <temp dir>/session_<date>_<time>_<usec>_<pid>/sockets/<name>, and AF_UNIX
# paths are capped at 107 bytes. With a 7-digit pid and the longest name (dash_TaskEventsHead, a
# dashboard module's socket) the part after the temp dir is 71 bytes; a few more are kept in reserve.
# Too long a temp dir fails loudly for the raylet but silently for `ray start`'s dashboard.
RAY_TEMP_DIR_MAX_LEN = 32


def ray_temp_link(root: str | os.PathLike) -> Path:
    """The short /tmp path that stands for root/ray when root/ray is too long (see ray_temp_dir)."""
    target = Path(root).resolve() / "ray"
    return Path("/tmp") / f"klrl-ray-{hashlib.sha1(str(target).encode()).hexdigest()[:10]}"


def ray_temp_dir(root: str | os.PathLike) -> Path:
    """Ray's temp dir for a local cluster: root/ray, reached through a short /tmp symlink when that
    path is too long for Ray's socket paths. The sessions and logs stay inside the run directory."""
    target = Path(root).resolve() / "ray"
    target.mkdir(parents=True, exist_ok=True)
    if len(str(target)) <= RAY_TEMP_DIR_MAX_LEN:
        return target
    link = ray_temp_link(root)
    if not (link.is_symlink() and link.resolve() == target):
        staging = link.with_name(f"{link.name}.{os.getpid()}")
        staging.unlink(missing_ok=True)
        staging.symlink_to(target, target_is_directory=True)
        staging.replace(link)  # atomic, so concurrent drivers never see a half-made link
    return link


def actor_env_vars() -> dict[str, str]:
    """The subset of this process's klrl environment every Ray worker shares (runtime_env env_vars):
    cache locations, hub access and the default thread count (for tasks such as the Tune trainable),
    none of this process's engine settings: an actor's come from workers/device.py."""
    keys = set(cache_env(Path("."))) | {"OMP_NUM_THREADS", "HF_HUB_OFFLINE"}
    return {k: os.environ[k] for k in keys if k in os.environ}
