"""A trial starts its learner and rollout actors side by side; a failed start leaves no actor behind."""
from __future__ import annotations

import time

import pytest

from core.config import Config, TinyModelConfig

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tasks.tiny_model import build_tiny_model

    return build_tiny_model(TinyModelConfig(num_layers=1, seed=2), tmp_path_factory.mktemp("tiny") / "policy")


def pg_bundles_free(ray, pg) -> bool:
    """True when every bundle of pg has all its reserved CPUs available (no actor holds them)."""
    available, total = ray.available_resources(), ray.cluster_resources()
    keys = [k for k in total if k.startswith("CPU_group_") and k.endswith(pg.id.hex())]
    return bool(keys) and all(available.get(k, 0.0) == total[k] for k in keys)


def test_a_failed_learner_start_shuts_the_started_rollout_down(ray_session, model_dir):
    from workers.engines import create_placement_group, start_engines

    config = Config().replace(**{"learner.backend": "nccl", "rollout.max_model_len": 128,
                                 "rollout.max_new_tokens": 8})
    pg = create_placement_group(config)
    # The learner dies in its constructor (nccl on a CPU-only machine) while vLLM starts fine beside it.
    with pytest.raises(Exception, match="learner.backend: 'nccl' needs a CUDA device"):
        start_engines(model_dir, config, pg)
    deadline = time.monotonic() + 30
    while not pg_bundles_free(ray_session, pg) and time.monotonic() < deadline:
        time.sleep(0.5)  # ray.kill releases resources asynchronously
    assert pg_bundles_free(ray_session, pg), ray_session.available_resources()
    ray_session.util.remove_placement_group(pg)
