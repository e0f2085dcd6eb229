"""Test session set-up: every cache under runs/test (never $HOME), CPU engines, shared fixtures.

The warm-started tiny policy is cached under runs/test/models by a hash of its config, so the first
test that needs it builds it (a few minutes on 2 cores) and every later test and session reuses it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("KLRL_RUN_DIR", str(ROOT / "runs" / "test"))

from workers import environment  # noqa: E402

TEST_RUN_DIR = environment.configure()


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif("not __import__('torch').cuda.is_available()",
                                   reason="needs a CUDA device; this machine has none")


@pytest.fixture(scope="session", autouse=True)
def remove_ray_temp_links():
    """At the end of the session, the /tmp links (see environment.ray_temp_dir) into runs/test."""
    yield
    for link in Path("/tmp").glob("klrl-ray-*"):
        if link.is_symlink() and os.readlink(link).startswith(str(TEST_RUN_DIR)):
            link.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def run_dir() -> Path:
    """The shared test run directory (caches, tiny-model cache)."""
    return TEST_RUN_DIR
