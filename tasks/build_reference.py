"""Build the shipped tiny reference policy: `python -m tasks.build_reference [--out DIR] [--threads N]`.

Builds the default tiny policy (TinyModelConfig() warm-started for TaskConfig(): the settings of the
default study) with the warm start's fixed schedule, then writes manifest.json (the cache key it was
built for and every file's sha256). Default --out is tasks/tiny_reference, the folder
`resolve_policy('tiny')` serves when the configs match; commit the result. The integration test
rebuilds it into a temporary folder and checks the figures land in the reference band (the weights
themselves differ between machines: floating-point rounding differs, so only the band is portable).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from core.config import TaskConfig, TinyModelConfig
from tasks.policy import REFERENCE_DIR, build_tiny_policy, tiny_cache_key, write_manifest


def build_reference(out: str | Path = REFERENCE_DIR, threads: int = 1, log=print) -> dict:
    """Build the default tiny policy into `out` (replaced atomically); returns its warm_start.json."""
    tiny, task = TinyModelConfig(), TaskConfig()
    out = Path(out)
    building = out.with_name(out.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    report = build_tiny_policy(tiny, task, building, log=log, threads=threads)
    write_manifest(building, tiny_cache_key(tiny, task))
    shutil.rmtree(out, ignore_errors=True)
    building.rename(out)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REFERENCE_DIR), help="folder to write (replaced)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the warm start")
    args = parser.parse_args(argv)
    report = build_reference(args.out, threads=args.threads)
    keys = ("eval_accuracy", "eval_distinct_valid", "expected_accuracy", "expected_distinct_valid",
            "logit_scale", "steps", "train_wall_s", "torch_threads")
    print(json.dumps({k: report[k] for k in keys}))


if __name__ == "__main__":
    main()
