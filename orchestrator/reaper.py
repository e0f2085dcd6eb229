"""The study's Ray dies with its driver, even a SIGKILLed one.

`klrl run` without --address starts an embedded Ray whose processes are the driver's descendants. When
the driver is SIGKILLed (or OOM-killed), Ray's GCS and raylet die with it, and so do the workers, but the
raylet's dashboard and runtime-env agents do not: on seeing the raylet gone they first report its death
through the GCS that died too, and wait out its reconnect timeout (over 60 s, measured). A killed driver
cannot clean up after itself, so this watcher does it: `klrl run` starts it (`start`) for the length of a
study, in a session of its own so the terminal's Ctrl-C or a killed process group leaves it running. While
the driver lives it notes the driver's descendants every second; once the driver is gone it gives them a
short grace to exit on their own, then SIGKILLs those still running, each by pid and start time
(orchestrator/processes.py). A study that ends normally stops the watcher (`stop`) after Ray's shutdown.
With --address the cluster's processes are not the driver's descendants: they are never touched.

If the watcher itself was killed too, the next `klrl run`/`report`/`ui` on the run dir stops the processes
the driver recorded in driver.json (orchestrator/stale.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from orchestrator import processes

INTERVAL_S = 1.0
GRACE_S = 3.0
LOG_FILE = "reaper.log"


def watch(driver: processes.Identity, interval_s: float = INTERVAL_S, grace_s: float = GRACE_S) -> list[str]:
    """Follow `driver`'s descendants until it is gone; then kill those that outlive it by `grace_s`."""
    return stop_survivors(follow(driver, interval_s), grace_s)


def follow(driver: processes.Identity, interval_s: float) -> list[processes.Identity]:
    """`driver`'s descendants (less this process) as last seen before it was gone."""
    me = os.getpid()
    tree: list[processes.Identity] = []
    while processes.is_running(driver):
        tree = [p for p in processes.descendants(driver[0]) if p[0] != me]
        time.sleep(interval_s)
    return tree


def stop_survivors(tree: list[processes.Identity], grace_s: float) -> list[str]:
    """Give `tree` `grace_s` to exit on its own (Ray's processes mostly do), then kill what still runs."""
    deadline = time.monotonic() + grace_s
    while any(map(processes.is_running, tree)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return processes.kill(tree)


def start(run_dir: Path) -> subprocess.Popen | None:
    """Watch this process (the driver) from a process of its own; None where /proc is missing. It shares
    the driver's stdout and stderr, so what it stops is said where the driver spoke, and in the run dir."""
    driver = processes.identity(os.getpid())
    if driver is None:
        return None
    root = str(Path(__file__).resolve().parents[1])  # where `orchestrator` imports from, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    log = Path(run_dir).resolve() / LOG_FILE
    return subprocess.Popen([sys.executable, "-m", "orchestrator.reaper", *map(str, driver), str(log)], env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def stop(watcher: subprocess.Popen | None) -> None:
    """The study ended in this driver: its Ray is shut down, nothing is left to watch."""
    if watcher is not None:
        watcher.terminate()
        watcher.wait(timeout=10)


def main(argv: list[str]) -> int:
    pid, ticks, log = int(argv[0]), int(argv[1]), Path(argv[2])
    for line in watch((pid, ticks)):
        message = f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} klrl: driver pid {pid} died; stopped {line}\n"
        sys.stderr.write(message)
        with open(log, "a") as out:
            out.write(message)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
