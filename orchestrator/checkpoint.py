"""A trial's checkpoints, and its metrics on their way to MLflow: each step logged exactly once.

Checkpoint format: `<root>/step_<s:06d>/` holds `learner/` (the learner's own checkpoint: weights,
optimizer, step counters, every rank's RNG states) and `state.json`:
    {"format": 1, "step": s, "pending": [[step, {metric key: value}], ...]}
`state.json` is written last, after everything else is in place, so a folder without a readable one is
half-written (the trial died while saving) and `newest` skips it with a warning. The step is the whole
prompt/RNG cursor: prompt order and sampling seeds are pure functions of (run.seed, step). `<root>` is any
pyarrow filesystem URI or path; a Tune trial's is `<storage>/<study>/trial_<id>/checkpoints`.

Exactly-once metrics (docs/DESIGN.md): `Ledger.record` buffers each step's metrics in memory; they are
stored in the next checkpoint (`pending`) and written to MLflow only after that checkpoint is complete,
one `log_batch` per step (one transaction) that carries the marker `LOGGED_STEP` = step. A restarted trial
resumes from the newest complete checkpoint and first writes its pending steps above the run's marker.
So a step reaches MLflow only from a complete checkpoint, never twice (the marker), and never goes
missing (every step after the newest complete checkpoint is recomputed and recorded again).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs

FORMAT = 1
KEEP = 2  # complete checkpoints kept per trial (the newest, and one before it)
LOGGED_STEP = "klrl/logged_step"  # marker metric: the last step whose metrics are in MLflow
STATE_FILE = "state.json"
FAULT_HANG_ENV = "KLRL_FAULT_HANG_IN_CHECKPOINT"  # fault injection only (fault_hook_hang)
HANGING_FILE = "FAULT_HOOK_HANGING"
logger = logging.getLogger("klrl.checkpoint")


@dataclass
class Checkpoint:
    """A complete checkpoint: its folder (on its store's filesystem), the step it was taken after, and the
    steps whose metrics it holds for MLflow."""

    path: str
    step: int
    pending: list[tuple[int, dict[str, float]]]


class CheckpointStore:
    """The checkpoints of one trial under `root` (a local path or a filesystem URI such as s3://...)."""

    def __init__(self, root: str, staging: str | Path):
        self.fs, self.root = pafs.FileSystem.from_uri(root) if "://" in root else (pafs.LocalFileSystem(),
                                                                                    str(Path(root).resolve()))
        self.staging = Path(staging)  # on a filesystem every learner rank shares (the run dir's tmp/)

    def save(self, step: int, pending: list, save_learner: Callable[[str], None]) -> Checkpoint:
        """Checkpoint after `step`: the learner saves into a staging folder, which is copied under root,
        then state.json is written. A folder of that step left by an earlier attempt is replaced."""
        target = f"{self.root}/step_{step:06d}"
        self.staging.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="ckpt-", dir=self.staging) as tmp:
            save_learner(str(Path(tmp) / "learner"))
            if self.fs.get_file_info(target).type != pafs.FileType.NotFound:
                self.fs.delete_dir(target)
            self.fs.create_dir(target)
            pafs.copy_files(tmp, target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        fault_hook_hang(step, target, self.fs)
        state = {"format": FORMAT, "step": step, "pending": [[s, m] for s, m in pending]}
        with self.fs.open_output_stream(f"{target}/{STATE_FILE}") as out:
            out.write(json.dumps(state).encode())
        return Checkpoint(target, step, [(s, m) for s, m in pending])

    def _folders(self) -> list[pafs.FileInfo]:
        found = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted((f for f in found if f.type == pafs.FileType.Directory and f.base_name.startswith("step_")),
                      key=lambda f: f.base_name)

    def _read(self, folder: pafs.FileInfo) -> Checkpoint | None:
        try:
            with self.fs.open_input_stream(f"{folder.path}/{STATE_FILE}") as stream:
                state = json.loads(stream.read())
            return Checkpoint(folder.path, int(state["step"]),
                              [(int(s), m) for s, m in state["pending"]])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def newest(self) -> Checkpoint | None:
        """The complete checkpoint of the highest step; half-written ones above it are skipped, loudly."""
        complete = []
        for folder in self._folders():
            checkpoint = self._read(folder)
            if checkpoint is None:
                logger.warning("klrl: skipping half-written checkpoint %s (no readable %s)", folder.path,
                               STATE_FILE)
            else:
                complete.append(checkpoint)
        return max(complete, key=lambda c: c.step, default=None)

    def load(self, checkpoint: Checkpoint, load_learner: Callable[[str], None]) -> None:
        """Hand the checkpoint's learner folder to `load_learner`, downloaded first when not local."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            load_learner(f"{checkpoint.path}/learner")
            return
        self.staging.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="restore-", dir=self.staging) as tmp:
            pafs.copy_files(f"{checkpoint.path}/learner", tmp, source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            load_learner(tmp)

    def prune(self, keep: int = KEEP) -> None:
        """Delete all but the `keep` newest complete checkpoints, and half-written ones below them."""
        steps = sorted((c.step, c.path) for f in self._folders() if (c := self._read(f)) is not None)
        if len(steps) < keep:
            return
        oldest_kept = steps[-keep][0]
        for folder in self._folders():
            if int(folder.base_name.split("_")[1]) < oldest_kept:
                self.fs.delete_dir(folder.path)


def fault_hook_hang(step: int, target: str, fs: pafs.FileSystem) -> None:
    """Fault-injection hook for tests/e2e/test_faults.py, never set otherwise: with
    KLRL_FAULT_HANG_IN_CHECKPOINT=<step>, the save of that step stops half-written (the learner's files
    under `target`, no state.json), writes `target`/HANGING_FILE so the test knows, and hangs until
    the test kills the process."""
    if os.environ.get(FAULT_HANG_ENV) != str(step):
        return
    with fs.open_output_stream(f"{target}/{HANGING_FILE}") as out:
        out.write(str(os.getpid()).encode())
    logger.warning("klrl: %s=%d: hanging in the checkpoint save of step %d until killed", FAULT_HANG_ENV, step, step)
    while True:
        time.sleep(1)


@dataclass
class Ledger:
    """A trial's metrics between its steps and MLflow (see the module docstring for the protocol)."""

    tracker: object  # orchestrator.tracking.MlflowTracker or NullTracker
    run_id: str
    pending: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    def record(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer step's metrics (step 0: the evaluation of pi_ref) until the next flush."""
        self.pending.append((step, dict(metrics)))

    def flush(self) -> None:
        """Write every pending step the run has not logged yet, in step order, one transaction each."""
        last = self.tracker.latest_metric(self.run_id, LOGGED_STEP)
        last = -1 if last is None else int(last)
        for step, metrics in sorted(self.pending, key=lambda item: item[0]):
            if step > last:
                self.tracker.log_metrics(self.run_id, {**metrics, LOGGED_STEP: step}, step=step)
        self.pending = []

    def checkpoint(self, store: CheckpointStore, step: int, save_learner: Callable[[str], None]) -> None:
        """Save a complete checkpoint holding the pending steps, then log them, then drop old checkpoints."""
        store.save(step, self.pending, save_learner)
        self.flush()
        store.prune()

    def restore(self, store: CheckpointStore, load_learner: Callable[[str], None]) -> int:
        """Load the newest complete checkpoint's learner and log its pending steps; returns its step
        (0 when there is none: the trial starts from scratch)."""
        checkpoint = store.newest()
        if checkpoint is None:
            return 0
        store.load(checkpoint, load_learner)
        self.pending = checkpoint.pending
        self.flush()
        return checkpoint.step
