"""Integration fixtures: a local Ray for the tests that run workers as actors."""
from __future__ import annotations

import pytest

from workers import environment


@pytest.fixture(scope="module")
def ray_session(run_dir):
    """Ray on this machine's 2 CPUs, temp dir under runs/test; shut down after the module."""
    import ray

    ray.init(num_cpus=2, _temp_dir=str(environment.ray_temp_dir(run_dir)), include_dashboard=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_policy(run_dir):
    """The default warm-started tiny policy (ModelConfig(), TaskConfig()), cached under the test run dir.

    Built in a fresh process: vLLM (which pins this process's OpenMP threads to cores) and DeepSpeed
    ZeRO-3 (which patches F.linear globally) run in-process in other tests and make a warm start here
    many times slower. Later calls are cache hits.
    """
    import subprocess
    import sys
    from pathlib import Path

    from core.config import ModelConfig, TaskConfig
    from tasks.policy import resolve_policy

    build = ("import sys; from pathlib import Path; from core.config import ModelConfig, TaskConfig; "
             "from tasks.policy import resolve_policy; resolve_policy(ModelConfig(path='tiny'), Path(sys.argv[1]), "
             "TaskConfig())")
    subprocess.run([sys.executable, "-c", build, str(run_dir)], check=True, timeout=1200,
                   cwd=Path(__file__).resolve().parents[2])
    return resolve_policy(ModelConfig(path="tiny"), run_dir, TaskConfig())
