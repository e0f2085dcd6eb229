"""core/ is pure math: importing all of it must not pull in the heavy engines (STYLE.md habit 1)."""
from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import core

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("ray", "vllm", "deepspeed", "mlflow", "transformers")


def _imported_after(modules: list[str], watch: tuple[str, ...]) -> list[str]:
    """Which of `watch` are in sys.modules after importing `modules` in a fresh interpreter.

    A fresh interpreter, because this test session may already have imported the engines elsewhere.
    """
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in {watch!r} if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_core_modules_do_not_import_engines():
    modules = ["core"] + [f"core.{m.name}" for m in pkgutil.iter_modules(core.__path__)]
    assert {"core.kl", "core.advantages", "core.losses", "core.metrics", "core.config", "core.types"} <= set(modules)
    # torch is watched too, as a guard that the check can fail: core does import it, so it must be seen.
    assert _imported_after(modules, FORBIDDEN + ("torch",)) == ["torch"]


def test_trial_loop_imports_no_engine_ray_or_hub():
    """orchestrator/trial.py talks to engines through core.types' protocols only (docs/DESIGN.md)."""
    modules = ["orchestrator.trial", "orchestrator.checkpoint", "orchestrator.evaluation"]
    watch = ("ray", "transformers", "huggingface_hub", "vllm", "deepspeed", "mlflow", "numpy")
    assert _imported_after(modules, watch) == ["numpy"]  # numpy: the check sees what is imported
