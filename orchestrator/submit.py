"""`klrl submit`: run a study as a Ray job on a running cluster, through Ray's job SDK.

`ray job submit --working-dir . -- klrl run SPACE` alone loses two things. The job runs in Ray's temporary
copy of the working dir, so a relative run dir (the default `runs/<study>`) puts the study's results in
that copy; and the copy has no `.git`, so trials cannot tell which commit they ran. `klrl submit` uploads
the working dir as Ray does, but passes the study an absolute run dir (the one `klrl run` would use here)
and the commit read on this side (env KLRL_GIT_COMMIT), prints the job id, follows the job's logs and
exits with the job's exit code. `klrl run` itself refuses a run dir inside the job's copy (`usable_in_job`).
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from orchestrator.tracking import GIT_COMMIT_ENV

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Never uploaded, whatever .gitignore says: the venv, local runs and the repository's history.
UPLOAD_EXCLUDES = ["/.git", "/.venv", "/runs"]
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in a job's entrypoint


class SubmitError(RuntimeError):
    """The job cannot be submitted (no dashboard at the address, a run dir the cluster cannot use)."""


def job_copy() -> Path | None:
    """Ray's copy of a submitted working dir, when this process is the entrypoint of a Ray job that
    uploaded one (the entrypoint runs inside the copy); else None."""
    try:
        runtime_env = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}
    except ValueError:
        return None
    return Path.cwd().resolve() if runtime_env.get("working_dir") else None


def inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def usable_in_job(run_dir: Path, study_name: str) -> bool:
    """Under `ray job submit --working-dir`, refuse a run dir inside Ray's temporary copy of the working
    dir (deleted with the session); and with no commit passed in, tag trials `unknown` rather than read
    whatever repository happens to enclose the copy. Says why on stderr."""
    copy = job_copy()
    if copy is None:
        return True
    if inside(run_dir, copy):
        print(f"klrl: error: run dir {run_dir} is inside Ray's temporary copy of the job's working dir ({copy}), "
              f"which Ray deletes: pass an absolute run dir the head node keeps, e.g. --run-dir "
              f"{Path.home() / 'klrl-runs' / study_name}, or submit with `klrl submit`, which passes one",
              file=sys.stderr)
        return False
    if not os.environ.get(GIT_COMMIT_ENV):
        print(f"klrl: warning: this Ray job's working dir has no git metadata: trials are tagged "
              f"git_commit=unknown (`klrl submit` passes the commit, or set {GIT_COMMIT_ENV} in the job's "
              "env_vars)", file=sys.stderr)
        os.environ[GIT_COMMIT_ENV] = "unknown"
    return True


def local_commit(folder: Path) -> tuple[str, bool]:
    """(HEAD's hash or 'unknown', whether the work tree has uncommitted changes)."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit, bool(commit != "unknown" and git("status", "--porcelain", "--untracked-files=no"))


def entrypoint(space: str, run_dir: Path, args, env_vars: dict[str, str]) -> str:
    """The job's command: `klrl run` with the absolute run dir and every option passed through, and its
    variables set on the command line: in the job's runtime_env they would clash with the same keys that
    `klrl run` hands its actors (Ray refuses a variable set in both)."""
    argv = ["env", *(f"{k}={v}" for k, v in env_vars.items()), "klrl", "run", space, "--run-dir", str(run_dir)]
    for override in args.set:
        argv += ["--set", override]
    for flag, value in (("--tracking-uri", args.tracking_uri), ("--storage-path", args.storage_path)):
        if value:
            argv += [flag, value]
    return shlex.join(argv + (["--resume"] if args.resume else []))


def submit(args, run_dir: Path, cache_root: Path | None, log=print) -> int:
    """Submit, print the job id, follow its logs; the job's exit code (or 0 with --no-wait)."""
    from ray.job_submission import JobSubmissionClient

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = args.address or os.environ.get("RAY_ADDRESS", "").strip() or DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    local = urlparse(address).hostname in LOOPBACK
    if not local and not args.run_dir:
        raise SubmitError(f"--run-dir: required with a remote cluster ({address}): a path on the head node, "
                          f"e.g. /home/ubuntu/klrl-runs/<study> (the default {run_dir} is this machine's)")
    working_dir = Path.cwd().resolve()
    space = Path(args.space).resolve()
    space_arg = str(space.relative_to(working_dir)) if inside(space, working_dir) else str(space)
    commit, dirty = local_commit(working_dir)
    if dirty:
        log(f"klrl: warning: uncommitted changes in {working_dir}: trials are tagged with HEAD {commit[:12]}, "
            "which does not hold them")
    env_vars = {GIT_COMMIT_ENV: commit}
    if local and cache_root is not None:  # share this machine's caches (tiny models, HF) with local runs
        env_vars["KLRL_RUN_DIR"] = str(cache_root)
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as exc:
        raise SubmitError(f"no Ray cluster answers at {address} ({exc}); start one (README, \"Local cluster\") "
                          "or pass --address http://<head>:8265") from None
    job_id = client.submit_job(entrypoint=entrypoint(space_arg, run_dir, args, env_vars), submission_id=args.job_id,
                               runtime_env={"working_dir": str(working_dir), "excludes": UPLOAD_EXCLUDES})
    log(f"klrl: submitted job {job_id} to {address}: run dir {run_dir}, commit {commit[:12]}")
    if args.no_wait:
        log(f"klrl: follow it with: ray job logs --follow --address {address} {job_id}")
        return 0
    return follow(client, job_id, address)


def follow(client, job_id: str, address: str) -> int:
    """Stream the job's logs to stdout until it ends; its driver's exit code (130 when stopped)."""
    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nklrl: stopped following; the job goes on. Stop it with: ray job stop --address {address} "
              f"{job_id}", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    for _ in range(60):  # the log stream can close a moment before the status turns terminal
        if info.status.is_terminal():
            break
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    print(f"klrl: job {job_id} {info.status.value}" + (f": {info.message}" if info.message else ""))
    if info.driver_exit_code is not None:
        return info.driver_exit_code
    return {JobStatus.SUCCEEDED: 0, JobStatus.STOPPED: 130}.get(info.status, 1)
