"""Ray's temp dir: inside the run dir, and reachable by socket paths short enough for AF_UNIX."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from workers import environment

# Ray's longest socket path below its temp dir: /session_<date>_<time>_<usec>_<7-digit pid>/sockets/
# dash_TaskEventsHead (a dashboard module). The whole path must fit in 107 bytes.
LONGEST_SOCKET_SUFFIX = len("/session_2026-11-25_08-03-01_459678_4194304/sockets/dash_TaskEventsHead")


def test_short_run_dir_keeps_ray_temp_dir_in_place():
    root = Path(tempfile.mkdtemp(prefix="k", dir="/tmp"))  # /tmp/kXXXXXXXX: short enough to use as is
    try:
        assert environment.ray_temp_dir(root) == root / "ray" and (root / "ray").is_dir()
        assert not environment.ray_temp_link(root).exists()
    finally:
        shutil.rmtree(root)


def test_long_run_dir_gets_a_short_link_into_it(tmp_path):
    root = tmp_path / ("deep_" * 12) / "study"  # like a checkout at /home/user/src/klrl/runs/test/e2e/<id>
    link = environment.ray_temp_dir(root)
    try:
        assert len(str(link)) + LONGEST_SOCKET_SUFFIX <= 107
        assert link.resolve() == (root / "ray").resolve() and (root / "ray").is_dir()
        (link / "session_x").mkdir()  # what Ray writes through the link lands in the run dir
        assert (root / "ray" / "session_x").is_dir()
        assert environment.ray_temp_dir(root) == link  # idempotent: same link, same target

        link.unlink()  # a stale link (e.g. to a removed run dir of the same name) is replaced
        link.symlink_to(tmp_path, target_is_directory=True)
        assert environment.ray_temp_dir(root).resolve() == (root / "ray").resolve()
    finally:
        environment.ray_temp_link(root).unlink(missing_ok=True)
