"""e2e fixtures: a short run dir per test (see e2e_helpers.py for why it must be short)."""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest


@pytest.fixture()
def short_run_dir(run_dir) -> Path:
    """runs/test/e2e/<8 hex>: removed after the test."""
    path = Path(run_dir) / "e2e" / uuid.uuid4().hex[:8]
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)
