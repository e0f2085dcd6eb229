"""Actor wiring (real Ray): bundles for Tune, bad input refused with clear errors, no hung actors.

The DeepSpeed/vLLM work of the groups is covered by test_data_parallel.py and test_weight_sync.py; this
module checks what the driver sees when something is wrong.
"""
from __future__ import annotations

import time

import pytest
import torch

from core.config import Config, TinyModelConfig

pytestmark = pytest.mark.timeout(600)  # bounded even on a loaded machine (idle: ~1 min)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tasks.tiny_model import build_tiny_model

    return build_tiny_model(TinyModelConfig(num_layers=1, seed=1), tmp_path_factory.mktemp("tiny") / "policy")


def learner_config(**dotted) -> Config:
    base = {"rollout.n_samples": 2, "task.prompts_per_step": 4, "learner.num_workers": 2}
    return Config().replace(**{**base, **dotted})


def test_bundles_fit_one_trial_in_two_cpus():
    from ray import tune

    from workers.engines import bundles_for, worker_bundles

    config = Config()
    assert bundles_for(config) == [{"CPU": 0.0}, {"CPU": 1.0}, {"CPU": 1.0}]
    factory = tune.PlacementGroupFactory(bundles_for(config))
    # Tune drops the all-zero head bundle: the trial reserves exactly its workers' 2 CPUs and the
    # placement group's bundle i is worker_bundles(config)[i].
    assert factory.head_bundle_is_empty and factory.required_resources == {"CPU": 2.0}
    assert factory.bundles == worker_bundles(config)
    gpu = config.replace(**{"learner.gpus_per_worker": 1.0, "rollout.gpus_per_worker": 0.5,
                            "learner.num_workers": 2, "rollout.cpus_per_worker": 2.0})
    assert bundles_for(gpu)[1:] == [{"CPU": 1.0, "GPU": 1.0}] * 2 + [{"CPU": 2.0, "GPU": 0.5}]


def test_placement_group_larger_than_cluster_refused(ray_session):
    from workers.engines import create_placement_group

    with pytest.raises(ValueError, match="needs 3 CPU"):
        create_placement_group(learner_config())  # 2 learners + 1 rollout on a 2-CPU cluster


@pytest.fixture(scope="module")
def pg(ray_session):
    from workers.engines import create_placement_group

    group = create_placement_group(learner_config(), rollouts=False)
    yield group
    ray_session.util.remove_placement_group(group)


def test_missing_model_folder(pg, tmp_path):
    from workers.actors import LearnerGroup, RolloutGroup

    with pytest.raises(FileNotFoundError, match="model_path: no Hugging Face model folder"):
        LearnerGroup(tmp_path / "absent", learner_config(), pg)
    with pytest.raises(FileNotFoundError, match="model_path"):
        RolloutGroup(tmp_path / "absent", learner_config(), pg, first_bundle=0)


def test_vocab_mismatch_refused_before_any_actor_starts(pg, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from workers.actors import LearnerGroup

    other = AutoModelForCausalLM.from_pretrained(model_dir)
    other.resize_token_embeddings(other.config.vocab_size + 8)
    other.save_pretrained(tmp_path / "bigger")
    with pytest.raises(ValueError, match="reference_path: vocabulary mismatch"):
        LearnerGroup(model_dir, learner_config(), pg, reference_path=tmp_path / "bigger")


def test_actor_side_error_surfaces_and_frees_the_bundles(ray_session, pg, model_dir):
    """Both ranks die in their constructors (nccl asked for on a CPU-only machine): the driver gets the
    error naming the field within seconds, not a rendezvous hang, and the bundles are free again."""
    from workers.actors import LearnerGroup

    start = time.monotonic()
    with pytest.raises(Exception, match="learner.backend: 'nccl' needs a CUDA device"):
        LearnerGroup(model_dir, learner_config(**{"learner.backend": "nccl"}), pg)
    assert time.monotonic() - start < 120
    group = LearnerGroup(model_dir, learner_config(), pg)  # fits only if the dead actors released the CPUs
    assert ray_session.get([a.ping.remote() for a in group.actors], timeout=60) == [0, 1]
    group.shutdown()


def test_call_timeout_names_the_call(ray_session):
    from workers.actors import _get

    @ray_session.remote(num_cpus=0)
    def slow():
        time.sleep(30)

    with pytest.raises(TimeoutError, match="learner update: no answer within 1 s"):
        _get(slow.remote(), "learner update", 1.0)


def test_export_weights_matches_the_model_folder(pg, model_dir):
    """Exported names are the HF names vLLM loads, and values are the folder's (no update yet)."""
    from transformers import AutoModelForCausalLM

    from workers.actors import LearnerGroup

    group = LearnerGroup(model_dir, learner_config(), pg)
    exported = dict(group.export_weights())
    group.shutdown()
    expected = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k].detach()) for k in expected)


def test_node_local_stores_refused_when_trials_need_other_nodes(ray_session, tmp_path):
    from orchestrator.launch import LaunchError, check_multi_node_storage

    sqlite = f"sqlite:///{tmp_path / 'mlflow.db'}"
    check_multi_node_storage(sqlite, str(tmp_path / "tune"), {"CPU": 2.0})  # fits this one node: fine
    # A trial needing a GPU this CPU-only cluster lacks means an autoscaler adds nodes: local stores refused.
    with pytest.raises(LaunchError, match="--tracking-uri sqlite.*--storage-path"):
        check_multi_node_storage(sqlite, str(tmp_path / "tune"), {"CPU": 1.0, "GPU": 4.0})
    check_multi_node_storage("http://mlflow.internal:5000", "s3://bucket/klrl", {"GPU": 4.0})  # shared: fine
