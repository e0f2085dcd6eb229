"""Helpers shared by the e2e tests: the `klrl` command exactly as a user types it, in a short run dir.

Run dirs live under runs/test/e2e/<short id> (not pytest's long tmp paths): Ray puts unix sockets under
its temp dir, and their paths must stay under 108 bytes. Caches (tiny model, HF) are shared through
KLRL_RUN_DIR=runs/test, set by tests/conftest.py and inherited by the subprocesses.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KLRL = str(Path(sys.executable).with_name("klrl"))
SMOKE = "search_spaces/smoke.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_shell_env(home: Path) -> dict[str, str]:
    """A new user's shell: PATH, LANG and a fake empty HOME, nothing klrl-specific but KLRL_RUN_DIR
    (so the cached tiny model is shared). klrl itself must set every cache variable it needs."""
    return {"PATH": os.environ["PATH"], "LANG": os.environ.get("LANG", "C.UTF-8"), "HOME": str(home),
            "KLRL_RUN_DIR": os.environ["KLRL_RUN_DIR"]}


def klrl(*args: str, timeout: float = 420, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`klrl ARGS...` from the repository root, output captured; fails the test on timeout."""
    try:
        return subprocess.run([KLRL, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env=env or os.environ.copy(), **kwargs)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"klrl {' '.join(args)} did not finish in {timeout}s; output tail:\n"
                    f"{(exc.stdout or b'')[-3000:]!r}\n{(exc.stderr or b'')[-3000:]!r}")


def trial_runs(run_dir: Path, experiment: str = "smoke") -> list:
    """The study's child runs (mlflow.search_runs over the run dir's sqlite store), as Run objects."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    return [r for r in runs if r.data.tags.get("klrl.role") == "trial"]
