"""Live progress: the step lines, their rate limit, the study ETA, and the two displays."""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from types import SimpleNamespace

from orchestrator import progress
from orchestrator.search_space import load_study

MINIATURE = Path(__file__).resolve().parents[2] / "search_spaces" / "miniature.yaml"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def report(step: int, **extra) -> dict:
    return {"step": step, "reward/mean": 0.6612, "kl/exact_reverse": 0.01314, "time/step_s": 0.214, **extra}


def test_durations_read_as_a_person_writes_them():
    assert [progress.duration(s) for s in (4.6, 100, 3725)] == ["5s", "1m40s", "1h02m"]


def test_lines_are_rate_limited_per_trial_but_first_and_last_steps_always_show():
    clock = Clock()
    board = progress.StudyBoard(total_trials=6, total_steps=120, clock=clock, interval_s=5.0)
    board.track("a", 3, "k3·loss s0", steps_total=20)
    assert board.start("a") == "[3/6 k3·loss s0] starting"
    clock.now = 10.0  # start-up: 10 s to the first report
    lines = [board.result("a", report(1, **{"time/startup_s": 9.0}))]
    for step in range(2, 21):
        clock.now += 1.0  # one step per second: a line every 5 s, plus the first and the last
        lines.append(board.result("a", report(step)))
    shown = [line for line in lines if line]
    assert [line.split(" step ")[1].split()[0] for line in shown] == ["1/20", "6/20", "11/20", "16/20", "20/20"]
    assert shown[0] == "[3/6 k3·loss s0] step 1/20 reward 0.66 kl 0.013 · 0.21 s/step · start-up 9s · study ETA ?"
    # 100 steps left at 1 s each, and 5 trials to start at 10 s each
    assert shown[-1] == "[3/6 k3·loss s0] step 20/20 reward 0.66 kl 0.013 · 0.21 s/step · study ETA 2m30s"


def test_eta_counts_trials_done_earlier_concurrency_and_the_latest_start_up():
    clock = Clock()
    board = progress.StudyBoard(total_trials=4, total_steps=40, clock=clock)
    board.track("done", 1, "none s0", steps_total=10, step=10)  # finished before --resume
    board.track("b", 2, "none s1", steps_total=10, step=4)  # resumes after step 4
    board.track("c", 3, "k3·loss s0", steps_total=10)
    assert board.start("b") == "[2/4 none s1] starting (resuming after step 4)"
    board.start("c")  # two trials at once
    clock.now = 30.0
    board.result("b", report(5))
    clock.now = 12.0
    board.result("c", report(1))
    for step, now in ((6, 32.0), (7, 34.0)):
        clock.now = now
        board.result("b", report(step))
    # 40 - (10 + 7 + 1) = 22 steps at 2 s, 1 trial to start at the latest start-up (12 s), 2 at once
    assert board.eta_s() == (22 * 2.0 + 12.0) / 2
    assert board.finish("b", report(10)).startswith("[2/4 none s1] finished 10/10 steps in 34s · reward 0.66")


def test_failures_say_where():
    board = progress.StudyBoard(total_trials=1, total_steps=3)
    board.track("a", 1, "none s0", steps_total=3)
    assert board.failure("a", True, None) == "[1/1 none s0] failed; restarting from its last checkpoint at step 0/3"
    assert board.failure("a", False, "/x/error.txt").endswith("FAILED at step 0/3: /x/error.txt")


def test_callback_prints_plain_lines_from_tune_events_and_pickles_without_its_display():
    study = load_study(MINIATURE)
    assert progress.expected_steps(study) == 6 * 20
    out, clock = io.StringIO(), Clock()
    callback = progress.StudyProgress(study, display=progress.PlainDisplay(out), clock=clock)
    callback.setup()
    trials = [SimpleNamespace(trial_id=f"t{i}", config={"grid": labels}, last_result={}, status="PENDING")
              for i, labels in enumerate(study.grid())]
    callback.on_trial_start(0, trials, trials[2])
    clock.now = 30.0
    callback.on_trial_result(0, trials, trials[2], report(1, steps_total=20))
    trials[2].last_result = report(20)
    callback.on_trial_complete(0, trials, trials[2])
    lines = out.getvalue().splitlines()
    assert lines[0] == "[3/6 k1·reward s0] starting"
    assert lines[1] == "[3/6 k1·reward s0] step 1/20 reward 0.66 kl 0.013 · 0.21 s/step · study ETA ?"
    assert lines[2] == "[3/6 k1·reward s0] finished 20/20 steps in 30s · reward 0.66 kl 0.013 · 1/6 trials done"
    restored = pickle.loads(pickle.dumps(callback))
    assert restored.study.name == "miniature" and restored.display is None


def test_rich_display_draws_bars_and_prints_news_above_them():
    from rich.console import Console

    out = io.StringIO()
    board = progress.StudyBoard(total_trials=2, total_steps=6)
    board.track("a", 1, "none s0", steps_total=3)
    display = progress.RichDisplay(6, console=Console(file=out, force_terminal=True, width=120))
    display.news(board.start("a"))
    for step in (1, 2):
        display.step(board, "a", board.result("a", report(step)), ["reward 0.66"])
    display.close()
    text = out.getvalue()
    assert "[1/2 none s0] starting" in text and "2/3" in text and "study" in text


def test_the_last_trial_to_finish_ends_the_display_before_tunes_closing_output():
    study = load_study(MINIATURE)
    closed = []
    display = SimpleNamespace(news=lambda line: None, step=lambda *a: None, close=lambda: closed.append(True))
    callback = progress.StudyProgress(study, display=display, clock=Clock())
    callback.setup()
    trials = [SimpleNamespace(trial_id=f"t{i}", config={"grid": labels}, last_result=report(20), status="RUNNING")
              for i, labels in enumerate(study.grid())]
    for trial in trials:
        callback.on_trial_complete(0, trials, trial)
        assert closed == ([True] if trial is trials[-1] else [])
        trial.status = "TERMINATED"  # as Tune sets it after the callback


def test_tune_table_shows_at_start_and_end_only_without_the_staging_logdir(capsys):
    reporter = progress.StartEndReporter(metric_columns={"step": "step"})
    trials = [object()]
    assert [reporter.should_report([]), reporter.should_report(trials), reporter.should_report(trials),
            reporter.should_report(trials, done=True)] == [False, True, False, True]
    reporter._print("== Status ==\nResult logdir: /tmp/klrl-ray-x/session/artifacts\nNumber of trials: 1")
    assert capsys.readouterr().out == "== Status ==\nNumber of trials: 1\n"


def test_a_failing_display_never_stops_the_study(capsys):
    class Broken(progress.PlainDisplay):
        def news(self, line):
            raise RuntimeError("terminal gone")

    study = load_study(MINIATURE)
    callback = progress.StudyProgress(study, display=Broken())
    callback.setup()
    trial = SimpleNamespace(trial_id="t0", config={"grid": study.grid()[0]}, last_result={}, status="PENDING")
    callback.on_trial_start(0, [trial], trial)  # raises inside: reported once, then plain lines
    callback.on_trial_result(0, [trial], trial, report(1))
    out, err = capsys.readouterr()
    assert "progress display error (RuntimeError: terminal gone); the study goes on" in err
    assert out.startswith("[1/6 none s0] step 1/20")
