"""Helpers shared by the e2e tests: the `klrl` command exactly as a user types it, in a short run dir.

Run dirs live under runs/test/e2e/<short id> (not pytest's long tmp paths): Ray puts unix sockets under
its temp dir, and their paths must stay under 108 bytes. Caches (tiny model, HF) are shared through
KLRL_RUN_DIR=runs/test, set by tests/conftest.py and inherited by the subprocesses.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KLRL = str(Path(sys.executable).with_name("klrl"))
RAY = str(Path(sys.executable).with_name("ray"))
SMOKE = "search_spaces/smoke.yaml"


@contextmanager
def short_tmpdir(prefix: str, tmp: Path = Path("/tmp")):
    """A short TMPDIR, removed afterwards, for a process that binds unix sockets in TMPDIR: a `ray start` with
    a dashboard (its modules start through a multiprocessing forkserver whose socket lives there) or Chromium
    (its singleton socket). AF_UNIX paths stop at 107 bytes, and the run dir's TMPDIR (tests/conftest.py)
    passes that in a deep checkout; a person's shell has a short one (usually none: /tmp). `tmp` is the
    folder that stands for /tmp (a test that binds /tmp elsewhere passes its stand-in); yields the path as
    the wrapped processes see it, /tmp/<name>."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp))
    try:
        yield Path("/tmp") / folder.name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_shell_env(home: Path) -> dict[str, str]:
    """A new user's shell: PATH, LANG and a fake empty HOME, nothing klrl-specific but KLRL_RUN_DIR
    (so the cached tiny model is shared), and PYTHONPATH when the suite runs a checkout through it.
    klrl itself must set every cache variable it needs."""
    env = {"PATH": os.environ["PATH"], "LANG": os.environ.get("LANG", "C.UTF-8"), "HOME": str(home),
           "KLRL_RUN_DIR": os.environ["KLRL_RUN_DIR"]}
    return env | ({"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {})


class Outside:
    """/tmp and $HOME, where no study may leave anything, watched around the commands `wrap` prefixes.

    Where this machine allows a private mount namespace (root with `unshare`), each wrapped command sees an
    empty folder of `folder` bound over /tmp and over $HOME, so what it writes there is exactly what lands in
    those folders, whatever else runs on the machine. Elsewhere (or for a place that holds the checkout, its
    venv or the run dir), the place is listed before and after instead.
    """

    def __init__(self, folder: Path):
        self.places = {Path("/tmp"): folder / "tmp", Path.home().resolve(): folder / "home"}
        # /tmp: its entries (a link's target is the run dir); $HOME: three levels, where caches and configs go
        self.levels = {Path("/tmp"): 1, Path.home().resolve(): 3}
        needed = (ROOT, Path(sys.executable).resolve(), folder.resolve())
        private = shutil.which("unshare") is not None and subprocess.run(
            ["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode == 0
        self.bound = {place: stand_in for place, stand_in in self.places.items()
                      if private and not any(place in p.parents for p in needed)}
        for stand_in in self.bound.values():
            stand_in.mkdir(parents=True, exist_ok=True)
        self.before = {place: listing(place, self.levels[place]) for place in self.places if place not in self.bound}

    @contextmanager
    def ignoring(self):
        """What appears in a listed place during the block is not the study's (e.g. installing Chromium)."""
        before = {place: listing(place, self.levels[place]) for place in self.before}
        yield
        for place in self.before:
            self.before[place] |= listing(place, self.levels[place]) - before[place]

    def wrap(self, argv: list[str]) -> list[str]:
        if not self.bound:
            return argv
        mounts = " && ".join(f'mount --bind "{stand_in}" "{place}"' for place, stand_in in self.bound.items())
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh", *argv]

    def left(self) -> list[str]:
        """What the wrapped commands left in /tmp and $HOME, as paths there, but the documented short links to
        a run dir's Ray temp dir (/tmp/klrl-ray-<hash>, see workers.environment.ray_temp_dir): those may stay,
        only as links."""
        found = []
        for place, stand_in in self.places.items():
            levels = self.levels[place]
            now = listing(stand_in, levels) if place in self.bound else listing(place, levels) - self.before[place]
            root = stand_in if place in self.bound else place
            for path in sorted(now):
                shown = place / path.relative_to(root)
                if place == Path("/tmp") and shown.name.startswith("klrl-ray-") and path.is_symlink():
                    continue
                found.append(f"{shown}{' (not a link)' if shown.name.startswith('klrl-ray-') else ''}")
        return found


def listing(place: Path, levels: int) -> set[Path]:
    """Entries of a folder, `levels` deep."""
    return {p for depth in range(1, levels + 1) for p in place.glob("/".join(["*"] * depth))} if place.is_dir() \
        else set()


def klrl(*args: str, timeout: float = 420, env: dict | None = None, outside: Outside | None = None,
         **kwargs) -> subprocess.CompletedProcess:
    """`klrl ARGS...` from the repository root, output captured (watched by `outside` when given); fails the
    test on timeout."""
    argv = outside.wrap([KLRL, *args]) if outside else [KLRL, *args]
    try:
        return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env=env or os.environ.copy(), **kwargs)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"klrl {' '.join(args)} did not finish in {timeout}s; output tail:\n"
                    f"{(exc.stdout or b'')[-3000:]!r}\n{(exc.stderr or b'')[-3000:]!r}")


def trial_runs(run_dir: Path, experiment: str = "smoke") -> list:
    """The study's child runs (mlflow.search_runs over the run dir's sqlite store), as Run objects."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    return [r for r in runs if r.data.tags.get("klrl.role") == "trial"]


def ray_cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def start_ray_head(temp_dir: Path, env: dict, *extra: str) -> tuple[subprocess.CompletedProcess, int, int]:
    """`ray start --head` on free ports (none of Ray's defaults, which another Ray here may hold) with its
    temp dir at temp_dir; returns (the command's result, GCS port, dashboard port)."""
    gcs, dash = free_port(), free_port()
    start = ray_cli("start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(dash), "--temp-dir", str(temp_dir),
                    "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                    "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port()),
                    "--runtime-env-agent-port", str(free_port()), "--disable-usage-stats", *extra, env=env)
    return start, gcs, dash


def processes_under(marker: str) -> list[int]:
    """Pids whose command line mentions `marker` (a head's unique temp dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def kill_head(marker: str) -> None:
    """Stop exactly the processes of the head whose temp dir is `marker` (never `ray stop`, which stops
    every Ray of this user on the machine)."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        pids = processes_under(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while processes_under(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
