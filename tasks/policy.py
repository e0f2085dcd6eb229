"""Resolve ModelConfig.path to a HF causal-LM folder every worker can load.

'tiny'  -> the shipped reference policy `tasks/tiny_reference/` when the tiny-model config and the
           task's data settings are the ones it was built for (its manifest.json records that cache key
           and a sha256 per file, verified on every resolve, so every machine starts the default study
           from the same pi_ref, bit for bit); otherwise built and warm-started here, cached under
           run_dir/models/tiny-<hash>. The hash covers the tiny-model config, the palindrome data
           settings the warm start uses and a code version, so a change to any of them builds a new
           folder and never reuses a stale one.
a path  -> validated: it must be a folder holding config.json and a tokenizer (tokenizer.json or
           tokenizer_config.json); otherwise a ModelFolderError (a ValueError) names the folder and what is
           missing (`check_model_folder`, which the workers use too).
hub id  -> ('org/name' that does not exist locally and does not look like a path) returned as is; the
           engines resolve it from their own HF cache (klrl never downloads at run time itself).
Concurrent trials that want the same tiny model take a file lock; the loser reuses the winner's folder.
The shipped folder is rebuilt with `python -m tasks.build_reference` (see that module).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import re
import shutil
from pathlib import Path

from core.config import ModelConfig, TaskConfig, TinyModelConfig

# Bump when the builder or the warm start change what they produce, so old caches are not reused
# (and the shipped reference, whose manifest records the old key, stops being used until rebuilt).
TINY_CODE_VERSION = 2
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
REFERENCE_DIR = Path(__file__).resolve().with_name("tiny_reference")
MANIFEST = "manifest.json"


def tiny_cache_key(tiny: TinyModelConfig, task: TaskConfig) -> str:
    """12 hex chars of sha256 over the tiny config, the warm start's data settings and TINY_CODE_VERSION.

    eval_size enters only as the size of the held-out split the warm start excludes (`held_out_cfg`),
    so studies that evaluate on up to HELD_OUT_PROMPTS prompts share one policy.
    """
    from tasks.warm_start import held_out_cfg

    data = held_out_cfg(task)
    data_fields = {k: getattr(data, k) for k in ("min_letters", "max_letters", "train_size", "eval_size",
                                                 "data_seed", "compact_prompt", "instruction")}
    blob = json.dumps({"tiny": dataclasses.asdict(tiny), "data": data_fields, "v": TINY_CODE_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_tiny_policy(tiny: TinyModelConfig, task: TaskConfig, out_dir: str | Path, log=print,
                      threads: int = 1) -> dict:
    """Build the random-init tiny model in out_dir and warm-start it there; returns warm_start.json."""
    from tasks.tiny_model import build_tiny_model
    from tasks.warm_start import warm_start

    build_tiny_model(tiny, out_dir)
    return warm_start(out_dir, tiny, task, log=log, threads=threads)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, cache_key: str) -> dict:
    """manifest.json: the cache key the folder was built for and the sha256 of every other file."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {"cache_key": cache_key, "sha256": {name: file_sha256(folder / name) for name in files}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_manifest(folder: Path, manifest: dict) -> None:
    """ValueError naming the first file that is missing or whose sha256 differs from the manifest."""
    for name, expected in manifest["sha256"].items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path}: missing from the shipped tiny reference policy (listed in {MANIFEST})")
        if file_sha256(path) != expected:
            raise ValueError(f"{path}: sha256 differs from {folder / MANIFEST}; restore the file from git or "
                             "rebuild the reference with `python -m tasks.build_reference`")


def shipped_policy(tiny: TinyModelConfig, task: TaskConfig, folder: Path = REFERENCE_DIR) -> Path | None:
    """The shipped reference folder if it was built for (tiny, task), checksums verified; else None."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("cache_key") != tiny_cache_key(tiny, task):
        return None
    verify_manifest(folder, manifest)
    return folder


def tiny_policy(tiny: TinyModelConfig, task: TaskConfig, run_dir: str | Path, log=print) -> Path:
    """The warm-started tiny policy folder: the shipped one when it matches, else built once per cache key."""
    shipped = shipped_policy(tiny, task)
    if shipped is not None:
        return shipped
    models = Path(run_dir) / "models"
    models.mkdir(parents=True, exist_ok=True)
    final = models / f"tiny-{tiny_cache_key(tiny, task)}"
    with open(models / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another trial may be building it; wait, then reuse
        if (final / "warm_start.json").exists():
            return final
        building = models / f"{final.name}.building"
        shutil.rmtree(building, ignore_errors=True)  # a crashed earlier build
        log(f"building tiny policy {final.name} (warm start, cached afterwards)")
        build_tiny_policy(tiny, task, building, log=log)
        building.rename(final)  # atomic: a folder named tiny-<hash> is always complete
    return final


class ModelFolderError(FileNotFoundError, ValueError):
    """A model path that is not a Hugging Face model folder (a ValueError of the config and a missing file)."""


def check_model_folder(path: str | Path, field: str = "model.path", tokenizer: bool = True) -> Path:
    """The resolved folder if it is a HF causal-LM folder: config.json, and a tokenizer unless `tokenizer`
    is False (a reference policy reuses the policy's). ModelFolderError naming `field` and what is missing.

    The one check of a model folder: the trial's policy, the learner's and the rollout engine's folders."""
    path = Path(path).expanduser()
    where = f"{field}: no Hugging Face model folder at {str(path)!r}"
    if not path.exists():
        raise ModelFolderError(f"{where}: it does not exist (expected 'tiny', a HF model folder with "
                               "config.json and a tokenizer, or a hub id like 'org/name')")
    if not path.is_dir():
        raise ModelFolderError(f"{where}: it is a file")
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if tokenizer and not any((path / f).exists() for f in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if missing:
        raise ModelFolderError(f"{where}: missing {', '.join(missing)}")
    return path.resolve()


def looks_like_path(text: str) -> bool:
    """True for anything a user meant as a filesystem path (absolute, ./, ../, ~, or not 'org/name')."""
    return text.startswith(("/", ".", "~")) or not HUB_ID_RE.match(text)


def resolve_policy(model_cfg: ModelConfig, run_dir: str | Path, task_cfg: TaskConfig | None = None,
                   log=print) -> Path | str:
    """A loadable model: a folder Path ('tiny' or a local folder), or a hub id string returned as is.

    task_cfg: the trial's task (the tiny warm start uses its letter counts and prompt settings);
    defaults to TaskConfig() when omitted.
    """
    if model_cfg.path == "tiny":
        return tiny_policy(model_cfg.tiny, task_cfg or TaskConfig(), run_dir, log=log)
    local = Path(model_cfg.path).expanduser()
    if local.exists() or looks_like_path(model_cfg.path):
        return check_model_folder(local)
    return model_cfg.path
