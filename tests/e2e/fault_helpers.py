"""What tests/e2e/test_faults.py needs around a running `klrl run`: its checkpoints, its Ray processes (by pid,
from Ray's actor and worker tables at the GCS address the driver records in driver.json, and the driver's
own process tree),
and the MLflow histories it leaves. Never a process name pattern: other studies (other users' Rays) share
the machine.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from e2e_helpers import KLRL, ROOT

KLRL_ACTORS = ("RolloutWorker", "LearnerWorker")


def start_driver(run_dir: Path, study: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    log = open(run_dir / f"driver-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen([KLRL, "run", str(study), "--run-dir", str(run_dir), *args], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def driver_output(run_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(run_dir.glob("driver-*.log")))


def complete_checkpoints(run_dir: Path, study: str = "smoke") -> dict[str, set[int]]:
    """Complete checkpoint steps per trial folder (a readable state.json marks a complete one)."""
    out: dict[str, set[int]] = {}
    for state in (run_dir / "tune" / study).glob("trial_*/checkpoints/step_*/state.json"):
        try:
            step = json.loads(state.read_text())["step"]
        except (OSError, ValueError, KeyError):
            continue
        out.setdefault(state.parents[2].name, set()).add(step)
    return out


def ray_address(run_dir: Path) -> str | None:
    """The GCS address the live driver recorded in driver.json (orchestrator/stale.record_driver)."""
    try:
        return json.loads((run_dir / "driver.json").read_text()).get("ray_address")
    except (OSError, ValueError):
        return None


def gcs_state(address: str):
    """Ray's state, read from the GCS at `address` (the actor and worker tables) without joining the
    cluster. klrl's local Ray runs no dashboard, so `ray.util.state`'s HTTP API is not there to ask."""
    from ray._private.state import GlobalState
    from ray._raylet import GcsClientOptions

    state = GlobalState()
    state._initialize_global_state(GcsClientOptions.create(address, None, allow_cluster_id_nil=True,
                                                           fetch_cluster_id_if_nil=False))
    return state


def alive_actors(address: str) -> list[dict]:
    """The study's ALIVE actors ({"ActorClassName", "Pid", ...}) from Ray's actor table."""
    return [a for a in gcs_state(address).actor_table(None).values() if a["State"] == "ALIVE"]


def worker_pids(address: str) -> set[int]:
    """Pids of the study's live worker processes (Ray's worker table; the driver's too)."""
    from ray.core.generated import gcs_pb2

    table = gcs_state(address)._connect_and_get_accessor().get_worker_table()
    return {w.pid for w in map(gcs_pb2.WorkerTableData.FromString, table) if w.is_alive and w.pid}


def actor_pid(address: str, which: str) -> int:
    """Pid of the one live rollout actor ('rollout'), learner rank 0 ('learner') or trainable ('trainable':
    the actor that is neither, i.e. Tune's function trainable holding the trial loop)."""
    actors = [(a["ActorClassName"], a["Pid"]) for a in alive_actors(address)]
    if which == "trainable":
        found = [pid for name, pid in actors if name not in KLRL_ACTORS]
        if len(found) > 1:  # Tune's function trainable is an ImplicitFunc actor
            found = [pid for name, pid in actors if "ImplicitFunc" in name]
    else:
        found = [pid for name, pid in actors if name == {"rollout": "RolloutWorker", "learner": "LearnerWorker"}[which]]
    assert len(found) == 1, f"not one live {which} actor among {actors}"
    return found[0]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (parent links from /proc/<pid>/stat). Read here, not with
    orchestrator/processes.py, so the suite is a witness independent of the watcher whose work it checks."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def cmdline(pid: int) -> str:
    """What `pid` runs (for the report of a leftover), read once it is found by pid."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:300]
    except OSError:
        return "?"


def wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    """Wait until none of `pids` lives; returns those still alive at the timeout."""
    deadline = time.monotonic() + timeout_s
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def histories(client, runs) -> dict[str, dict[str, list[int]]]:
    """{run name: {metric key: [steps, as logged]}}."""
    return {run.info.run_name: {key: [m.step for m in client.get_metric_history(run.info.run_id, key)]
                                for key in run.data.metrics} for run in runs}


def worker_logs(run_dir: Path) -> str:
    """Every Ray worker's stderr of the study's local Rays (<run dir>/ray/session_*/logs)."""
    return "".join(p.read_text(errors="replace") for p in (run_dir / "ray").glob("session_*/logs/worker-*.err"))
