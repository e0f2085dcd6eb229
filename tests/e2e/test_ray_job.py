"""The README's "Local cluster" section, run as written: start a head bound to 127.0.0.1 with a temp dir of
its own, `klrl submit` the smoke study, stop that head only. In between, plain `ray job submit` with the
default (relative) run dir must be refused with the absolute `--run-dir` to use.

Two substitutions only: free ports instead of the README's defaults (another Ray may hold them), and the
virtualenv that runs this suite instead of `.venv` when the checkout has none.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_helpers import ROOT, free_port, kill_head, processes_under, short_tmpdir, trial_runs

JOB_TIMEOUT_S = 480


def readme_blocks(section: str) -> list[str]:
    """The ```bash blocks of a README section, in order."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", body, flags=re.S)


def bash(script: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"timed out after {timeout}s:\n{(exc.stdout or b'')[-3000:]!r}\n{(exc.stderr or b'')[-3000:]!r}")


@pytest.fixture
def shell_tmpdir():
    with short_tmpdir("klrl-job-") as folder:
        yield folder


def test_readme_local_cluster_submits_the_smoke_study(run_dir, shell_tmpdir):
    start_and_submit, ray_job_submit, stop = readme_blocks("Local cluster")
    assert "klrl submit search_spaces/smoke.yaml" in start_and_submit and "ray stop" not in stop
    ray_port, dash_port = free_port(), free_port()
    script = start_and_submit.replace("RAY_PORT=6379 DASHBOARD_PORT=8265",
                                      f"RAY_PORT={ray_port} DASHBOARD_PORT={dash_port}")
    if not (ROOT / ".venv").is_dir():
        script = script.replace(". .venv/bin/activate", f". {Path(sys.executable).parent}/activate")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "TMPDIR": str(shell_tmpdir)}
    study_dir = Path(env["KLRL_RUN_DIR"]) / "smoke"  # where `klrl submit` puts it by default
    shutil.rmtree(study_dir, ignore_errors=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    done = bash(script + '\nstatus=$?\necho "HEAD_TMP=$HEAD_TMP"\nexit $status\n', env, JOB_TIMEOUT_S)
    head_tmp = re.search(r"^HEAD_TMP=(\S+)$", done.stdout, flags=re.M).group(1)
    assert head_tmp.startswith("/tmp/klrl-head-")
    try:
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        assert "klrl: submitted job" in done.stdout and "klrl: 2/2 trial(s) finished" in done.stdout
        assert "[1/2 none s0] step 1/3 reward" in done.stdout  # the job's logs: plain progress lines
        runs = trial_runs(study_dir)
        assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
        assert {r.data.tags["git_commit"] for r in runs} == {head or "unknown"}  # the commit, not 'unknown'
        state = json.loads((study_dir / "driver.json").read_text())
        assert state["tracking_uri"] == f"sqlite:///{study_dir / 'mlflow.db'}"
        assert not list(Path(head_tmp).rglob("mlflow.db"))  # nothing of the study in Ray's copy

        # KLRL_RUN_DIR emptied: the head inherited this suite's (absolute) one, which would make the default
        # run dir absolute; a user's head has none.
        relative = bash(f"{script.splitlines()[0]}\nray job submit --address http://127.0.0.1:{dash_port} "
                        "--working-dir . --runtime-env-json '{\"env_vars\": {\"KLRL_RUN_DIR\": \"\"}}' "
                        "-- klrl run search_spaces/smoke.yaml", env, 180)
        said = relative.stdout + relative.stderr
        assert "is inside Ray's temporary copy of the job's working dir" in said, said[-3000:]
        assert "--run-dir /" in said and relative.returncode == 1  # `ray job submit`: 1 when the job failed
        assert "ray job submit" in ray_job_submit and '--run-dir "$PWD/' in ray_job_submit
    finally:
        stopped = bash(stop, {**env, "HEAD_TMP": head_tmp}, 60)
        left = processes_under(head_tmp)
        kill_head(head_tmp)  # only if the README's stop missed some: then the test fails below
    assert stopped.returncode == 0, stopped.stderr
    assert not left and not Path(head_tmp).exists(), left
    shutil.rmtree(study_dir, ignore_errors=True)


if os.environ.get("KLRL_SKIP_E2E"):  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="KLRL_SKIP_E2E is set")
