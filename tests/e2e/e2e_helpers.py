"""Helpers shared by the e2e tests: the `klrl` command exactly as a user types it, in a short run dir.

Run dirs live under runs/test/e2e/<short id> (not pytest's long tmp paths): Ray puts unix sockets under
its temp dir, and their paths must stay under 108 bytes. Caches (tiny model, HF) are shared through
KLRL_RUN_DIR=runs/test, set by tests/conftest.py and inherited by the subprocesses.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KLRL = str(Path(sys.executable).with_name("klrl"))
RAY = str(Path(sys.executable).with_name("ray"))
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


def ray_cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def start_ray_head(temp_dir: Path, env: dict, *extra: str) -> tuple[subprocess.CompletedProcess, int, int]:
    """`ray start --head` on free ports (none of Ray's defaults, which another Ray here may hold) with its
    temp dir at temp_dir; returns (the command's result, GCS port, dashboard port)."""
    gcs, dash = free_port(), free_port()
    start = ray_cli("start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(dash), "--temp-dir", str(temp_dir),
                    "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                    "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port()),
                    "--runtime-env-agent-port", str(free_port()), "--disable-usage-stats", *extra, env=env)
    return start, gcs, dash


def processes_under(marker: str) -> list[int]:
    """Pids whose command line mentions `marker` (a head's unique temp dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def kill_head(marker: str) -> None:
    """Stop exactly the processes of the head whose temp dir is `marker` (never `ray stop`, which stops
    every Ray of this user on the machine)."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        pids = processes_under(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while processes_under(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
