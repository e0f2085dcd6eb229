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
