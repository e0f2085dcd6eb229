"""`klrl validate SPACE --placement`: a study's launch path up to the point where actors would load models.

On the Ray cluster a real `klrl run` would use (`--address`, or a local Ray), this does what the launch
does before the first model load, with the same code: the refusals of `launch.check_cluster_gpus`, the
trial's placement group exactly as Tune builds it (`tune.PlacementGroupFactory(bundles_for(config))`),
and in every learner and rollout bundle a probe actor started with the real actor's options
(`workers.actors.actor_options`). Each probe reports the device it was given (`workers.device.describe`):
its engine environment, Ray's CUDA_VISIBLE_DEVICES, the dist backend, the torch/vLLM builds on its node.
No engine starts, no model loads, no CUDA call runs; the placement groups and probes are removed after.

On a GPU cluster this is the first-contact check of docs/GPU.md; on a CPU machine `ray start
--num-gpus=N` declares logical GPUs and the same dry run checks the GPU path (tests/e2e/test_gpu_dry_run.py).
"""
from __future__ import annotations

import time
from pathlib import Path

from orchestrator.launch import check_cluster_gpus, connect_ray
from orchestrator.search_space import Study

# An autoscaler may first have to launch a GPU node and run its setup (the CUDA stack, the pre-fetch).
PG_TIMEOUT_S = 1800.0


def distinct_trial_shapes(study: Study) -> list:
    """One trial config per distinct bundle list (a seed study has one shape for all its trials)."""
    from workers.engines import bundles_for

    shapes: dict[str, object] = {}
    for labels in study.grid() or [{}]:
        config = study.trial_config(labels)
        shapes.setdefault(repr(bundles_for(config)), config)
    return list(shapes.values())


def format_report(role: str, index: int, report: dict) -> str:
    env = report["env"]
    return (f"  {role} {index}  node {report['node']}  {report['device']}  gpus={report['gpus']:g} "
            f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r} DS_ACCELERATOR={env.get('DS_ACCELERATOR')} "
            f"VLLM_TARGET_DEVICE={env.get('VLLM_TARGET_DEVICE')} "
            f"VLLM_CPU_KVCACHE_SPACE={env.get('VLLM_CPU_KVCACHE_SPACE')} OMP_NUM_THREADS={env.get('OMP_NUM_THREADS')}"
            + (f" backend={report['backend']}" if role == "learner" else ""))


def probe_shape(config, log=print, timeout_s: float = PG_TIMEOUT_S) -> list[str]:
    """Place one trial of `config` like Tune does, probe every actor slot; returns the problems found."""
    import ray
    from ray import tune

    from workers import device
    from workers.actors import probe_devices
    from workers.engines import bundles_for

    factory = tune.PlacementGroupFactory(bundles_for(config))
    log(f"klrl: placement group {factory.bundles} ({factory.strategy}); waiting up to {timeout_s:.0f} s "
        "(an autoscaler may first launch and set up a node)")
    started = time.monotonic()
    pg = factory.to_placement_group()
    problems: list[str] = []
    try:
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            return [f"placement group {factory.bundles} not ready after {timeout_s:.0f} s; the cluster has "
                    f"{ray.available_resources()} free"]
        log(f"klrl: placement group ready in {time.monotonic() - started:.1f} s")
        logical_nodes = set()
        for role, index, report in probe_devices(config, pg):
            log(format_report(role, index, report))
            log(f"      torch {report['torch']}, {report.get('vllm', 'no vLLM')}")
            problems += [f"{role} {index}: {p}" for p in device.problems(report, role)]
            if report["gpus"] > 0 and not report["nvidia_device_files"]:
                logical_nodes.add(report["node"])
        for node in sorted(logical_nodes):
            log(f"klrl: note: node {node} has no NVIDIA device files: its GPUs are logical (declared with "
                "--num-gpus), so the torch/vLLM builds there were not checked")
    finally:
        ray.util.remove_placement_group(pg)
    return problems


def placement_dry_run(study: Study, run_dir: Path, address: str | None, log=print) -> list[str]:
    """Connect to Ray (or start a local one), refuse what a launch refuses, probe every trial shape;
    returns the problems found (empty: every actor would start on the device it was given)."""
    import ray

    connect_ray(address, run_dir)
    try:
        resources = ray.cluster_resources()
        log(f"klrl: Ray cluster {address or 'started here'}: {resources.get('CPU', 0):g} CPU, "
            f"{resources.get('GPU', 0):g} GPU, {sum(1 for n in ray.nodes() if n.get('Alive'))} node(s)")
        check_cluster_gpus(study, address)
        problems: list[str] = []
        for config in distinct_trial_shapes(study):
            problems += probe_shape(config, log)
        return problems
    finally:
        ray.shutdown()
