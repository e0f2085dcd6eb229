"""e2e fixtures: a short run dir per test (see e2e_helpers.py for why it must be short), and one finished
smoke study shared by the tests that check its results, its MLflow UI and what it left outside its run dir."""
from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e_helpers import ROOT, SMOKE, Outside, fresh_shell_env, klrl


@pytest.fixture()
def short_run_dir(run_dir) -> Path:
    """runs/test/e2e/<8 hex>: removed after the test."""
    path = Path(run_dir) / "e2e" / uuid.uuid4().hex[:8]
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class SmokeStudy:
    run_dir: Path
    home: Path  # the fake, initially empty $HOME the study ran with
    storage: Path  # Tune's --storage-path (stands in for the NFS/S3 path a cluster would use)
    done: subprocess.CompletedProcess
    elapsed_s: float
    commit: str  # the checkout's HEAD when the study started ('' outside a git checkout)
    outside: Outside  # /tmp and $HOME, watched around the study and the commands run on it later


@pytest.fixture(scope="session")
def smoke_study(run_dir) -> SmokeStudy:
    """`klrl run search_spaces/smoke.yaml` as a new user types it (fresh shell env, empty $HOME), with /tmp
    and $HOME watched; removed at the end of the session."""
    path = Path(run_dir) / "e2e" / uuid.uuid4().hex[:8]
    home, storage = path / "home", path / "shared_storage"
    home.mkdir(parents=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    outside, start = Outside(path / "outside"), time.monotonic()
    done = klrl("run", SMOKE, "--run-dir", str(path), "--storage-path", str(storage), env=fresh_shell_env(home),
                outside=outside)
    yield SmokeStudy(path, home, storage, done, time.monotonic() - start, commit, outside)
    shutil.rmtree(path, ignore_errors=True)
