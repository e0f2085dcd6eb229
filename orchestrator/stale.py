"""Stale runs: MLflow runs left RUNNING by a driver that died (SIGKILL, OOM, a lost node) are made visible.

Every `klrl run` records who drives the run dir in `driver.json` (`driver`: pid, host, the process's start
time in clock ticks since boot, and the wall-clock start for people), next to the MLflow ids `--resume`
rereads. A later `klrl run`, `klrl report` or `klrl ui` on that run dir first asks whether that driver is
still alive: same host and a live pid with the same start time (so a recycled pid is not taken for the
driver). If it is dead, every run of its study still RUNNING (the parent run and its trial runs) is
marked stale: tag `klrl.stale=true`, tag `klrl.stale_reason` naming the dead driver, and status KILLED,
so the MLflow UI shows it ended and the tag says why (filter: tags.`klrl.stale` = 'true'). A `--resume`
that reopens a stale run clears the tag (`MlflowTracker.reopen`). A driver on another host cannot be
checked from here: its runs are left alone, and `klrl report`/`klrl ui` say so.

The same commands first stop what the dead driver left running (`stop_leftovers`): the processes of its
embedded Ray it recorded, should the watcher meant to stop them (orchestrator/reaper.py) have died too.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator import processes
from orchestrator.tracking import PARENT_TAG, STALE_REASON_TAG, STALE_TAG, TERMINAL

DRIVER_FILE = "driver.json"


@dataclass(frozen=True)
class Driver:
    """The process that drives a run dir."""

    pid: int
    host: str
    start_ticks: int | None  # field 22 of /proc/<pid>/stat; None where /proc is missing

    def describe(self) -> str:
        return f"driver pid {self.pid} on {self.host}"


def this_driver() -> Driver:
    return Driver(os.getpid(), socket.gethostname(), processes.start_ticks(os.getpid()))


def is_alive(driver: Driver, host: str | None = None) -> bool | None:
    """True/False for a driver on this host (`host`, default this machine's name); None on another host."""
    if driver.host != (host or socket.gethostname()):
        return None
    if Path("/proc/self/stat").exists():
        ticks = processes.start_ticks(driver.pid)
        return ticks is not None and (driver.start_ticks is None or ticks == driver.start_ticks)
    try:
        os.kill(driver.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(run_dir: Path) -> dict:
    path = Path(run_dir) / DRIVER_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def record_driver(run_dir: Path, own_processes: list[processes.Identity] = (), **extra) -> None:
    """Write this process as the run dir's driver into driver.json (plus `extra`, e.g. the Ray address),
    keeping the MLflow ids already there. `own_processes` (pid, start ticks) are the driver's own (an embedded
    Ray's), for `stop_leftovers`. Written atomically: a reader never sees half a file."""
    me = this_driver()
    state = {**read_state(run_dir), **extra,
             "driver": {"pid": me.pid, "host": me.host, "start_ticks": me.start_ticks,
                        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "processes": [list(p) for p in own_processes]}}
    tmp = Path(run_dir) / f".{DRIVER_FILE}.{me.pid}"
    tmp.write_text(json.dumps(state))
    tmp.replace(Path(run_dir) / DRIVER_FILE)


def recorded_driver(state: dict) -> Driver | None:
    d = state.get("driver")
    if not d:
        return None
    return Driver(int(d["pid"]), str(d["host"]), d.get("start_ticks"))


def stop_leftovers(run_dir: Path) -> list[str]:
    """If the run dir's recorded driver died on this host, SIGKILL the processes it recorded that still run
    (matched by pid and start time; orchestrator/reaper.py normally got them first); one line per process."""
    state = read_state(run_dir)
    driver = recorded_driver(state)
    if driver is None or is_alive(driver) is not False:
        return []
    return processes.kill([(int(pid), int(ticks)) for pid, ticks in state["driver"].get("processes", [])])


def open_runs(client, state: dict) -> list:
    """The study's parent run and its trial runs that are not in a terminal state."""
    experiment_id, parent_id = state.get("experiment_id"), state.get("parent_run_id")
    if not experiment_id or not parent_id:
        return []
    children = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                  max_results=10000)
    runs = [client.get_run(parent_id), *children]
    return [r for r in runs if r.info.status not in TERMINAL]


def mark_stale(run_dir: Path, tracking_uri: str | None = None) -> list[str]:
    """If the run dir's recorded driver is dead, mark its open runs stale (module docstring); returns one
    line per run marked. A live driver, one on another host, or no driver.json: nothing is marked. The
    store is the one driver.json records, else `tracking_uri`."""
    state = read_state(run_dir)
    driver = recorded_driver(state)
    if driver is None or is_alive(driver) is not False:
        return []
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=state.get("tracking_uri") or tracking_uri)
    reason = f"{driver.describe()} (started {state['driver'].get('started_at', '?')}) died with this run open"
    marked = []
    for run in open_runs(client, state):
        client.set_tag(run.info.run_id, STALE_TAG, "true")
        client.set_tag(run.info.run_id, STALE_REASON_TAG, reason)
        client.set_terminated(run.info.run_id, status="KILLED")
        marked.append(f"{run.info.run_name} ({run.info.run_id[:8]})")
    return marked


def stale_runs(client, experiment_ids: list[str]) -> list:
    """Every run tagged stale in the experiments, newest first."""
    return client.search_runs(experiment_ids, filter_string=f"tags.`{STALE_TAG}` = 'true'", max_results=10000,
                              order_by=["attributes.start_time DESC"])


def describe_stale(run_dir: Path, tracking_uri: str) -> list[str]:
    """For `klrl report` and `klrl ui`: mark what is stale now, then one line per stale run of the study
    (and a line when the recorded driver is on another host, so cannot be checked from here)."""
    state = read_state(run_dir)
    if not state.get("experiment_id"):
        return []
    mark_stale(run_dir, tracking_uri)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    lines = [f"stale run {r.info.run_name} ({r.info.run_id[:8]}): {r.data.tags.get(STALE_REASON_TAG, '')}"
             for r in stale_runs(client, [state["experiment_id"]])]
    driver = recorded_driver(state)
    if driver is not None and is_alive(driver) is None and open_runs(client, state):
        lines.append(f"{driver.describe()} is on another host: its RUNNING runs cannot be checked from here")
    return lines


def report_section(client, experiment_ids: list[str]) -> str:
    """report.md's list of stale runs (empty when there are none)."""
    runs = stale_runs(client, experiment_ids)
    if not runs:
        return ""
    why = "Left open by a driver that died (tag `klrl.stale`); `klrl run ... --resume` continues them."
    lines = ["## Stale runs", "", why, ""]
    lines += [f"- {r.info.run_name} ({r.info.run_id[:8]}): {r.data.tags.get(STALE_REASON_TAG, '')}" for r in runs]
    return "\n".join(lines + [""])
