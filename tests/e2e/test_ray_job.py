"""The cluster path: `ray start --head`, then `ray job submit --working-dir . -- klrl run smoke.yaml`.

The head node gets free ports for everything it would otherwise bind to a fixed default (so it cannot
clash with another Ray on this machine) and a temp dir inside the test's run dir (reached through a
short /tmp link when the path is too long for Ray's sockets). It is torn down by killing exactly the
processes it started (found by that temp dir), not with `ray stop`, which would stop every Ray
instance of this user on the machine.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import pytest
from e2e_helpers import SMOKE, kill_head, processes_under, ray_cli, start_ray_head, trial_runs

from workers import environment

JOB_TIMEOUT_S = 420


def test_ray_job_submit_runs_the_smoke_study(short_run_dir):
    temp_dir = environment.ray_temp_dir(short_run_dir)  # a short link when the checkout's path is long
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    start, _, dash = start_ray_head(temp_dir, env, "--num-cpus", "2")
    try:
        assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
        address = f"http://127.0.0.1:{dash}"
        job_id = f"klrl-smoke-{uuid.uuid4().hex[:6]}"
        run_dir = short_run_dir / "study"  # absolute: the job's working dir is a temporary copy
        submit = ray_cli("job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
                         "--working-dir", ".", "--", "klrl", "run", SMOKE, "--run-dir", str(run_dir), env=env)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        deadline, status = time.monotonic() + JOB_TIMEOUT_S, "PENDING"
        while time.monotonic() < deadline:
            status = ray_cli("job", "status", "--address", address, job_id, env=env).stdout.upper()
            if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
                break
            time.sleep(5)
        logs = ray_cli("job", "logs", "--address", address, job_id, env=env).stdout
        assert "SUCCEEDED" in status, f"job status: {status[-1000:]}\nlogs:\n{logs[-4000:]}"
        assert "klrl: 2/2 trial(s) finished" in logs
        runs = trial_runs(run_dir)
        assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
        state = json.loads((run_dir / "driver.json").read_text())
        assert state["tracking_uri"].startswith("sqlite:///")
    finally:
        kill_head(str(temp_dir))
    assert not processes_under(str(temp_dir))


if os.environ.get("KLRL_SKIP_E2E"):  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="KLRL_SKIP_E2E is set")
