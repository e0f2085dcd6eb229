"""Live progress of a study, printed by the driver from what the trials report to Tune:

    [3/6 k3·loss s0] step 12/20 reward 0.66 kl 0.013 · 0.21 s/step · study ETA 1m40s

At most one line per trial every LINE_INTERVAL_S (its first and last steps always), plus a line when a
trial starts, finishes, fails or restarts. On a terminal the same news drives a rich display instead: one
bar per running trial and one for the study, with the start/finish lines printed above them. Anything
else (CI, a log file, `ray job logs`) gets the plain lines. Tune's own status table is printed twice, when
the trials are known and when the study ends (`StartEndReporter`).

The study's ETA counts the steps left, the trials' start-up and the concurrency the cluster actually gives
(see StudyBoard).
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from ray import tune

from orchestrator.naming import short_trial_name

LINE_INTERVAL_S = 3.0
PROGRESS_ENV = "KLRL_PROGRESS"  # 'plain' or 'rich' forces a display; default: rich on a terminal


def duration(seconds: float) -> str:
    """45s, 1m40s, 2h05m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class TrialProgress:
    index: int  # 1-based position among the study's trials
    label: str  # e.g. 'k3·loss s0'
    steps_total: int
    step: int = 0  # the last step reported (1-based); before this session's first report, the steps done earlier
    started_at: float | None = None  # when it started in this session
    last_result_at: float | None = None
    last_line_at: float = -math.inf
    running: bool = False


class StudyBoard:
    """Pure bookkeeping behind the display: each trial's progress, the study's ETA, and which step lines
    are due. Every method returns the line to show (or None).

    ETA = (steps left x wall time per step + trials not started x start-up time) / trials running at once,
    from what this session has seen: the median wall time between consecutive reports of a trial (steps with
    an evaluation are slower), and the latest trial's start to its first report (see eta_s).
    """

    def __init__(self, total_trials: int, total_steps: int, clock: Callable[[], float] = time.monotonic,
                 interval_s: float = LINE_INTERVAL_S):
        self.total_trials, self.total_steps = total_trials, total_steps
        self.clock, self.interval_s = clock, interval_s
        self.trials: dict[str, TrialProgress] = {}
        self.step_walls: deque[float] = deque(maxlen=50)
        self.startups: list[float] = []
        self.most_running = 1

    def track(self, key: str, index: int, label: str, steps_total: int, step: int = 0) -> None:
        """Register a trial; `step` = the steps it had done before this session (a resumed study)."""
        self.trials[key] = TrialProgress(index, label, steps_total, step=step)

    def prefix(self, trial: TrialProgress) -> str:
        return f"[{trial.index}/{self.total_trials} {trial.label}]"

    def start(self, key: str) -> str:
        trial = self.trials[key]
        trial.started_at, trial.last_result_at, trial.running = self.clock(), None, True
        self.most_running = max(self.most_running, sum(t.running for t in self.trials.values()))
        resumed = f" (resuming after step {trial.step})" if trial.step else ""
        return f"{self.prefix(trial)} starting{resumed}"

    def result(self, key: str, result: dict[str, Any]) -> str | None:
        """Record a reported step; the step line when it is due."""
        trial, now = self.trials[key], self.clock()
        step = int(result.get("step", trial.step + 1))
        first = trial.last_result_at is None
        if first and trial.started_at is not None:
            self.startups.append(now - trial.started_at)
        elif not first and step > trial.step:
            self.step_walls.append((now - trial.last_result_at) / (step - trial.step))
        trial.step, trial.last_result_at = step, now
        if not (first or step >= trial.steps_total or now - trial.last_line_at >= self.interval_s):
            return None
        trial.last_line_at = now
        line = " ".join([f"{self.prefix(trial)} step {step}/{trial.steps_total}", *metric_words(result)])
        extras = [f"{result['time/step_s']:.2f} s/step"] if _number(result.get("time/step_s")) else []
        if first and _number(result.get("time/startup_s")):
            extras.append(f"start-up {duration(result['time/startup_s'])}")
        eta = self.eta_s()
        extras.append(f"study ETA {duration(eta)}" if eta is not None else "study ETA ?")
        return " · ".join([line, *extras])

    def finish(self, key: str, result: dict[str, Any] | None) -> str:
        trial = self.trials[key]
        trial.step, trial.running = max(trial.step, int((result or {}).get("step", 0))), False
        took = f" in {duration(self.clock() - trial.started_at)}" if trial.started_at is not None else ""
        words = " ".join(metric_words(result or {}))
        done = sum(1 for t in self.trials.values() if t.step >= t.steps_total)
        eta = self.eta_s() if done < self.total_trials else None
        tail = f" · {done}/{self.total_trials} trials done" + (f" · study ETA {duration(eta)}" if eta else "")
        return f"{self.prefix(trial)} finished {trial.step}/{trial.steps_total} steps{took}" \
               + (f" · {words}" if words else "") + tail

    def failure(self, key: str, retrying: bool, where: str | None) -> str:
        trial = self.trials[key]
        trial.running = False
        what = "failed; restarting from its last checkpoint" if retrying else "FAILED"
        return f"{self.prefix(trial)} {what} at step {trial.step}/{trial.steps_total}" + (f": {where}" if where else "")

    def steps_done(self) -> int:
        return sum(min(t.step, t.steps_total) for t in self.trials.values())

    def eta_s(self) -> float | None:
        """Seconds left for the whole study; None until a trial has reported two steps."""
        if not self.step_walls:
            return None
        begun = sum(1 for t in self.trials.values() if t.started_at is not None or t.step >= t.steps_total)
        to_start = max(0, self.total_trials - begun)
        # The latest start-up, not a mean: once Tune reuses a finished trial's process (and its warm engines)
        # a trial starts in a second, while the first, cold start took 20 s and more.
        startup = self.startups[-1] if self.startups else 0.0
        work = max(0, self.total_steps - self.steps_done()) * statistics.median(self.step_walls)
        return (work + to_start * startup) / self.most_running


def metric_words(result: dict[str, Any]) -> list[str]:
    """'reward 0.66', 'kl 0.013' (the exact reverse KL, else the k1 estimate)."""
    words = []
    if _number(result.get("reward/mean")):
        words.append(f"reward {result['reward/mean']:.2f}")
    kl = next((result[k] for k in ("kl/exact_reverse", "kl/k1_mean") if _number(result.get(k))), None)
    if kl is not None:
        words.append(f"kl {kl:.2g}")
    return words


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def expected_steps(study) -> int:
    """Steps the whole study will run: each grid point's run.steps (Optuna: their mean per sample)."""
    per_point = [study.trial_config(labels).run.steps for labels in (study.grid() or [{}])]
    if study.optuna:
        return round(sum(per_point) / len(per_point) * study.num_trials())
    return sum(per_point) * study.tune.get("num_samples", 1)


def quiet_tune_output() -> None:
    """Silence Tune's warning that its experiment state was snapshotted twice within 5 s: a study whose
    trials checkpoint every few seconds (the miniature one) triggers it again and again, to no one's use."""
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


# ---- displays -----------------------------------------------------------------------------------

class PlainDisplay:
    """One line per piece of news, flushed at once (CI logs, `ray job logs`)."""

    def __init__(self, stream=None):
        self.stream = stream

    def news(self, line: str | None) -> None:
        if line:
            print(line, file=self.stream or sys.stdout, flush=True)

    def step(self, board: StudyBoard, key: str, line: str | None, words: list[str]) -> None:
        self.news(line)

    def drop(self, key: str) -> None:
        pass

    def close(self) -> None:
        pass


class RichDisplay:
    """A bar per running trial and one for the study; news lines printed above them."""

    def __init__(self, total_steps: int, console=None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), console=console, refresh_per_second=2)
        self.total_steps = total_steps
        self.tasks: dict[str, Any] = {}
        self.study_task = None

    def news(self, line: str | None) -> None:
        if line:
            self._ensure_started()
            self.progress.console.print(line, highlight=False, markup=False)

    def step(self, board: StudyBoard, key: str, line: str | None, words: list[str]) -> None:
        self._ensure_started()
        trial = board.trials[key]
        info = " ".join(words)
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(board.prefix(trial), total=trial.steps_total, info=info)
        self.progress.update(self.tasks[key], completed=trial.step, info=info)
        eta = board.eta_s() if board.steps_done() < board.total_steps else None
        self.progress.update(self.study_task, completed=board.steps_done(),
                             info=f"ETA {duration(eta)}" if eta is not None else "")
        if trial.step >= trial.steps_total:
            self.drop(key)

    def drop(self, key: str) -> None:
        if key in self.tasks:
            self.progress.remove_task(self.tasks.pop(key))
            self.progress.refresh()  # at once: a finished trial's bar must not linger in the next frame

    def close(self) -> None:
        if self.study_task is not None:
            self.progress.stop()

    def _ensure_started(self) -> None:
        if self.study_task is None:
            self.progress.start()
            self.study_task = self.progress.add_task("study", total=self.total_steps, info="")


def pick_display(total_steps: int):
    """rich on a terminal, plain lines elsewhere; $KLRL_PROGRESS=plain|rich decides instead when set."""
    choice = os.environ.get(PROGRESS_ENV, "")
    terminal = sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"
    return RichDisplay(total_steps) if choice == "rich" or (choice != "plain" and terminal) else PlainDisplay()


# ---- Tune ---------------------------------------------------------------------------------------

class StudyProgress(tune.Callback):
    """Feeds Tune's trial events to a StudyBoard and shows them (see the module docstring)."""

    def __init__(self, study, display=None, clock: Callable[[], float] = time.monotonic):
        self.study, self.clock, self._display = study, clock, display
        self.board, self.display = None, None

    def setup(self, **info):
        self.board = StudyBoard(self.study.num_trials(), expected_steps(self.study), clock=self.clock)
        self.display = self._display or pick_display(self.board.total_steps)

    def __getstate__(self):
        # Tune pickles its run config (callbacks included) for --resume; a display holds a live terminal.
        return {"study": self.study, "clock": self.clock, "_display": None, "board": None, "display": None}

    def _track(self, trials, trial, result: dict | None = None) -> str:
        """The trial's key on the board, registered on first sight; a report's label and total win."""
        key, result = trial.trial_id, result or {}
        known = self.board.trials.get(key)
        if known is None:
            grid, search = trial.config.get("grid", {}), trial.config.get("search") or None
            label = result.get("trial_label") or short_trial_name(self.study, grid, search)
            steps_total = result.get("steps_total") or self.study.trial_config(grid, search).run.steps
            before = (trial.last_result or {}).get("step", 0)  # steps done in an earlier session
            self.board.track(key, trials.index(trial) + 1, label, int(steps_total), step=int(before))
        else:
            known.label = result.get("trial_label") or known.label
            known.steps_total = int(result.get("steps_total") or known.steps_total)
        return key

    def on_trial_start(self, iteration, trials, trial, **info):
        self._guard(self._started, trials, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._guard(self._result, trials, trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._guard(self._complete, trials, trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._guard(self._failed, trials, trial, True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._guard(self._failed, trials, trial, False)

    def on_experiment_end(self, trials, **info):
        self._guard(self.display.close)

    def _started(self, trials, trial) -> None:
        for other in trials:  # trials finished in an earlier session count as done (for the ETA)
            if other.status == "TERMINATED" and other.trial_id not in self.board.trials:
                self._track(trials, other)
        self.display.news(self.board.start(self._track(trials, trial)))

    def _complete(self, trials, trial) -> None:
        self.display.news(self.board.finish(self._track(trials, trial), trial.last_result))
        # The last trial: the bars end here, before Tune's closing output (Tune marks `trial` TERMINATED after
        # this call; a search creates its trials as it goes, hence the count).
        if len(trials) >= self.board.total_trials and all(t is trial or t.status in ("TERMINATED", "ERROR")
                                                           for t in trials):
            self.display.close()

    def _result(self, trials, trial, result: dict) -> None:
        key = self._track(trials, trial, result)
        self.display.step(self.board, key, self.board.result(key, result), metric_words(result))

    def _failed(self, trials, trial, retrying: bool) -> None:
        key = self._track(trials, trial)
        self.display.drop(key)
        self.display.news(self.board.failure(key, retrying, getattr(trial, "error_file", None)))

    def _guard(self, fn: Callable, *args) -> None:
        """Run a display update; a failure in it must never stop the study: report it once, go plain."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - any bug here is cosmetic, the study must go on
            broken, self.display = self.display, PlainDisplay()
            try:
                broken.close()
            except Exception:  # noqa: BLE001
                pass
            if not getattr(self, "_failed_once", False):
                self._failed_once = True
                print(f"klrl: progress display error ({type(exc).__name__}: {exc}); the study goes on",
                      file=sys.stderr, flush=True)


class StartEndReporter(tune.CLIReporter):
    """Tune's status table when the trials are first known and when the study ends, nothing between
    (StudyProgress reports the steps), and without Tune's 'Result logdir' line: a staging folder in
    Ray's temp dir, not where the study's results are."""

    def __init__(self, **kwargs):
        super().__init__(max_report_frequency=10**9, **kwargs)
        self._started = False

    def should_report(self, trials, done: bool = False) -> bool:
        if done or (trials and not self._started):
            self._started = True
            return True
        return False

    def _print(self, msg: str) -> None:
        print("\n".join(line for line in msg.splitlines() if not line.startswith("Result logdir:")), flush=True)
