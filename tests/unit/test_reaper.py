"""The watcher that stops what a SIGKILLed driver leaves running (orchestrator/reaper.py), on real processes:
a stand-in driver starts the watcher as `klrl run` does and a child that, like Ray's agents, outlives it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from orchestrator import processes, reaper

ROOT = Path(__file__).resolve().parents[2]
DRIVER = """
import subprocess, sys, time
from pathlib import Path
from orchestrator import reaper
watcher = reaper.start(Path(sys.argv[1]))
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(watcher.pid, child.pid, flush=True)
if sys.argv[2] == "ends":
    child.kill(); child.wait()
    reaper.stop(watcher)
    print(watcher.returncode, flush=True)
else:
    time.sleep(300)
"""


def start_driver(run_dir: Path, how: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(run_dir), how], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)


def wait_gone(pid: int, ticks: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while processes.is_running((pid, ticks)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not processes.is_running((pid, ticks))


def test_what_a_sigkilled_driver_left_running_is_stopped_and_said(tmp_path):
    driver = start_driver(tmp_path, "killed")
    watcher_pid, child_pid = map(int, driver.stdout.readline().split())
    watcher, child = processes.identity(watcher_pid), processes.identity(child_pid)
    assert os.getsid(watcher_pid) == watcher_pid != os.getsid(driver.pid)  # a Ctrl-C of the terminal spares it
    time.sleep(2.5 * reaper.INTERVAL_S)  # the watcher has seen the child
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert processes.is_running(child)  # the driver's death alone does not stop it (it is reparented)
    assert wait_gone(*child, timeout_s=reaper.INTERVAL_S + reaper.GRACE_S + 10)
    assert wait_gone(*watcher, timeout_s=5)  # its job done, the watcher is gone too
    log = (tmp_path / reaper.LOG_FILE).read_text()
    assert f"driver pid {driver.pid} died; stopped pid {child_pid} (" in log and "time.sleep(300)" in log


def test_a_study_that_ends_stops_its_watcher_and_kills_nothing(tmp_path):
    driver = start_driver(tmp_path, "ends")
    driver.stdout.readline()
    assert int(driver.stdout.readline()) == -signal.SIGTERM  # stopped by the driver, not gone on its own
    assert driver.wait(timeout=30) == 0
    assert not (tmp_path / reaper.LOG_FILE).exists()


def test_only_what_outlives_the_grace_is_killed():
    """A process that exits within the grace is left to exit; one that stays is killed."""
    quick = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    stays = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    killed = reaper.stop_survivors([processes.identity(quick.pid), processes.identity(stays.pid)], grace_s=3)
    assert quick.wait(timeout=5) == 0 and stays.wait(timeout=5) == -signal.SIGKILL
    assert [line.split(" (")[0] for line in killed] == [f"pid {stays.pid}"]
