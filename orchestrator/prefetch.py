"""Fetch every hub model and dataset that a study's trials will load, with the loaders the trials use.

Trials never download mid-study: `trial.local_model` resolves a hub model id from the local Hugging Face
cache only, and the DeepScaleR task reads a hub dataset through the `datasets` cache
(`tasks.deepscaler.load_rows`). cluster.yaml runs this on every node before Ray starts there:

    python -m orchestrator.prefetch search_spaces/seed_*.yaml

It walks every trial of each study, so what is fetched is exactly what the studies name; local paths
and the locally built 'tiny' policy need nothing. Both caches live under $HF_HOME, which must be the
one the trials see (cluster.yaml sets it for the setup commands and for `ray start` alike).
"""
from __future__ import annotations

import sys
from pathlib import Path

from orchestrator.search_space import Study, load_study


def hub_assets(studies: list[Study]) -> tuple[set[str], set[str]]:
    """(hub model ids, hub dataset ids) that the trials of `studies` load."""
    from tasks.deepscaler import looks_like_file
    from tasks.policy import looks_like_path

    models, datasets = set(), set()
    for study in studies:
        for labels in study.grid() or [{}]:
            config = study.trial_config(labels)
            model = config.model.path
            if model != "tiny" and not (Path(model).expanduser().exists() or looks_like_path(model)):
                models.add(model)
            data = config.task.data_path
            if config.task.name == "deepscaler" and not (Path(data).expanduser().exists() or looks_like_file(data)):
                datasets.add(data)
    return models, datasets


def fetch(models: set[str], datasets: set[str], log=print) -> None:
    """Download each model snapshot and dataset into the local caches (skipped when already there)."""
    from huggingface_hub import snapshot_download

    from tasks.deepscaler import load_rows

    for model in sorted(models):
        log(f"klrl prefetch: model {model} -> {snapshot_download(model)}")
    for dataset in sorted(datasets):
        log(f"klrl prefetch: dataset {dataset}: {len(load_rows(dataset))} rows")


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m orchestrator.prefetch STUDY.yaml [STUDY.yaml ...]", file=sys.stderr)
        return 2
    models, datasets = hub_assets([load_study(path) for path in argv])
    fetch(models, datasets)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
