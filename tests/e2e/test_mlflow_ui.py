"""What a person sees: `klrl ui` on the finished smoke study, loaded in a real headless Chromium, opens on
the runs table listing the trials by their short names. Then: nothing the study, the UI or the browser did
stayed in /tmp or $HOME (the documented /tmp/klrl-ray-* link excepted, only as a link).

Chromium is Debian's `chromium` package; when it is missing the test installs it (apt-get, as root) and
skips with the reason when it cannot.
"""
from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from e2e_helpers import KLRL, ROOT, Outside, free_port, fresh_shell_env, short_tmpdir

TRIAL_NAMES = ("none s0", "k3·loss s0")
PIP_LOCK = "/tmp/klrl-pip.lock"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def chromium(smoke_study) -> str:
    """The chromium binary, installed with apt-get when missing (root and Debian's registry needed)."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed, and installing it needs root and apt-get: apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # On a machine shared by several checkouts, package installs take turns on this lock.
    lock = ["flock", PIP_LOCK] if Path(PIP_LOCK).exists() and shutil.which("flock") else []
    install = [*lock, "apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    with smoke_study.outside.ignoring():
        done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:  # a fresh image has no package lists yet
            subprocess.run([*lock, "apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
            done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0 or not shutil.which("chromium"):
        pytest.skip(f"chromium could not be installed with apt-get: {(done.stderr or done.stdout)[-500:]}")
    return shutil.which("chromium")


def start_ui(run_dir: Path, home: Path, outside: Outside) -> tuple[subprocess.Popen, str]:
    """`klrl ui RUN_DIR` in its own process group; (the process, the URL it tells the user to open)."""
    port = free_port()
    ui = subprocess.Popen(outside.wrap([KLRL, "ui", str(run_dir), "--port", str(port)]), cwd=ROOT,
                          env=fresh_shell_env(home),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url, seen = None, []
    for line in ui.stdout:
        seen.append(line)
        if line.startswith("klrl: open "):
            url = line.split("klrl: open ", 1)[1].strip()
            break
    assert url, "".join(seen)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return ui, url
        except OSError:
            time.sleep(0.5)
    stop(ui)
    pytest.fail("klrl ui: the MLflow server did not answer /health in 90 s")


def stop(process: subprocess.Popen) -> None:
    """End the process group this test started (the MLflow server and its workers)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def rendered_text(chromium: str, url: str, folder: Path, budget_ms: int, outside: Outside) -> str:
    """The page's text after `budget_ms` of virtual time, as Chromium renders it (scripts run, data fetched)."""
    folder.mkdir(parents=True, exist_ok=True)
    profile = folder / f"profile-{budget_ms}"  # a fresh browser: no workflow type or view state remembered
    with short_tmpdir("klrl-chromium-", outside.bound.get(Path("/tmp"), Path("/tmp"))) as tmpdir:
        env = {"PATH": os.environ["PATH"], "HOME": str(folder / "home"), "TMPDIR": str(tmpdir),
               "XDG_CONFIG_HOME": str(folder / "config"), "XDG_CACHE_HOME": str(folder / "cache")}
        done = subprocess.run(outside.wrap([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                            f"--virtual-time-budget={budget_ms}", "--dump-dom", url]),
                              capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    page = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", done.stdout, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def test_mlflow_ui_opens_on_the_trial_runs_in_a_browser(smoke_study, chromium):
    assert smoke_study.done.returncode == 0, smoke_study.done.stdout[-3000:]
    ui, url = start_ui(smoke_study.run_dir, smoke_study.home, smoke_study.outside)
    try:
        for budget_ms in (15000, 40000):  # a slow machine gets a second, longer look
            text = rendered_text(chromium, url, smoke_study.run_dir / "chromium", budget_ms, smoke_study.outside)
            if all(name in text for name in TRIAL_NAMES):
                break
    finally:
        stop(ui)
    assert all(name in text for name in TRIAL_NAMES), text[:3000]
    assert "workflowType=machine_learning" in url
    assert "2 matching runs" in text  # the runs table lists exactly the two trials, not the parent
    assert "Evaluation" not in text and "Traces" in text  # model-training navigation (GenAI mode says Evaluation)
    assert "collects usage data" not in text  # MLflow's telemetry notice
    print(f"rendered: {text[:400]}")


def test_nothing_new_outside_the_run_dir(smoke_study):
    """What the study, `klrl report`, `klrl ui` and Chromium left in /tmp and $HOME."""
    assert smoke_study.outside.left() == []
