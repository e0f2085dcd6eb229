"""Fault injection: the smoke study (2 trials, 10 steps, a checkpoint every 2) run through three drivers while
every fault of docs/RELIABILITY.md's table strikes it, as a user's bad day would. Run alone: `pytest -m faults`.

One study run carries every fault, one after the other, so the suite pays for three drivers, not nine
(trials run one at a time, `tune.max_concurrent_trials: 1`, so each fault hits the trial it was meant for):
1. driver 1: after the first new checkpoint, SIGKILL the rollout actor (it dies mid-step); after the next,
   SIGKILL learner rank 0; after the next, SIGKILL the trial's trainable process; after the next, SIGINT
   the driver. Tune retries each killed trial from its newest complete checkpoint; SIGINT ends the study
   with no run RUNNING.
2. driver 2 (`--resume`, with the checkpoint writer's fault hook KLRL_FAULT_HANG_IN_CHECKPOINT=6): the
   unfinished trial hangs half-way through its step-6 checkpoint save; the driver is SIGKILLed there.
   Its Ray dies with it (no process of it left, by pid), its open runs stay RUNNING until `klrl report`
   marks them stale (orchestrator/stale.py) and says so.
3. driver 3 (`--resume`): the half-written checkpoint is skipped with a warning, the trial restarts right
   after its newest complete one, and the study finishes.
Then: both trials FINISHED, every (metric, step) exactly once, every step present, one `time/startup_s` per
start, the report written, no run RUNNING or stale, and no process any of the three drivers started alive.
Processes are found by pid: actors and workers from Ray's state API at the address the driver records in
driver.json, plus the driver's process tree; never by name.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from fault_helpers import (
    actor_pid,
    alive,
    cmdline,
    complete_checkpoints,
    descendants,
    driver_output,
    histories,
    kill_all,
    ray_address,
    start_driver,
    wait_gone,
    worker_logs,
    worker_pids,
)
from mlflow import MlflowClient

from e2e_helpers import ROOT, SMOKE, klrl, trial_runs
from orchestrator.checkpoint import FAULT_HANG_ENV, HANGING_FILE

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

STEPS = 10
HANG_AFTER = 4  # driver 2 hangs in the save of the checkpoint this many steps after where it resumed
DRIVER_ONE_FAULTS = ("rollout", "learner", "trainable", "sigint")


def fault_study(run_dir: Path) -> Path:
    """search_spaces/smoke.yaml with 10 steps, room for the retries, and one trial at a time."""
    raw = yaml.safe_load((ROOT / SMOKE).read_text())
    raw["base"]["run"].update(steps=STEPS, checkpoint_every=2, eval_every=4, samples_every=4, diversity_every=4)
    raw["tune"] = {"max_failures": 3, "max_concurrent_trials": 1}
    path = run_dir / "faults.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class Injector(threading.Thread):
    """Driver 1's faults: each strikes after the next new complete checkpoint short of the last step."""

    def __init__(self, run_dir: Path, driver):
        super().__init__(daemon=True)
        self.run_dir, self.driver, self.stop = run_dir, driver, threading.Event()
        self.events: list[dict] = []  # {fault, trial, after_step, pid, t}
        self.seen_pids: set[int] = set()  # every Ray worker of the study (state API), for the leftover check
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._inject()
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def _inject(self) -> None:
        seen = {(t, s) for t, steps in complete_checkpoints(self.run_dir).items() for s in steps}
        faults, last_poll = list(DRIVER_ONE_FAULTS), 0.0
        while faults and not self.stop.is_set() and self.driver.poll() is None:
            address = ray_address(self.run_dir)
            if address and time.monotonic() - last_poll > 3:
                try:
                    self.seen_pids |= worker_pids(address)
                except Exception:  # the state API starts a little after the driver records its address
                    pass
                last_poll = time.monotonic()
            new = sorted((t, s) for t, steps in complete_checkpoints(self.run_dir).items() for s in steps
                         if (t, s) not in seen and s <= STEPS - HANG_AFTER)
            seen |= {(t, s) for t, steps in complete_checkpoints(self.run_dir).items() for s in steps}
            if not new or not address:
                time.sleep(0.1)
                continue
            fault, (trial, step) = faults.pop(0), new[0]
            if fault == "sigint":
                pid = self.driver.pid
                self.driver.send_signal(signal.SIGINT)
            else:
                pid = retry(lambda: actor_pid(address, fault))
                os.kill(pid, signal.SIGKILL)
            self.events.append({"fault": fault, "trial": trial, "after_step": step, "pid": pid,
                                "t": time.monotonic()})


def retry(call, timeout_s: float = 20):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def recovery_s(events: list[dict], checkpoint_times: dict) -> None:
    """Each actor fault's recovery time: kill -> the trial's next complete checkpoint."""
    for e in events:
        later = [t for (trial, step), t in checkpoint_times.items() if trial == e["trial"] and step > e["after_step"]
                 and t > e["t"]]
        e["recovered_s"] = round(min(later) - e["t"], 1) if later else None


@pytest.fixture(scope="module")
def fault_run(run_dir, tmp_path_factory):
    import uuid

    folder = Path(run_dir) / "e2e" / f"f{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    study, out, times = fault_study(folder), {"phases": {}}, {}
    try:
        yield from _fault_run(folder, study, out, times)
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def _watch_checkpoints(folder: Path, times: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        for trial, steps in complete_checkpoints(folder).items():
            for step in steps:
                times.setdefault((trial, step), time.monotonic())
        time.sleep(0.2)


def _fault_run(folder: Path, study: Path, out: dict, times: dict):
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_checkpoints, args=(folder, times, stop), daemon=True)
    watcher.start()
    pids: set[int] = set()
    # 1. rollout actor, learner rank, trainable process SIGKILLed; then SIGINT of the driver
    start = time.monotonic()
    driver = start_driver(folder, study)
    injector = Injector(folder, driver)
    injector.start()
    try:
        injector.join(timeout=600)
        assert injector.error is None, injector.error
        out["driver1_rc"] = driver.wait(timeout=180)
    finally:
        injector.stop.set()
        driver.kill()
    pids |= injector.seen_pids | {driver.pid}
    out["phases"]["driver 1"] = time.monotonic() - start
    out["events"] = injector.events
    out["after_sigint"] = {r.info.run_name: r.info.status for r in trial_runs(folder)}
    out["killed_alive"] = [e["pid"] for e in injector.events if e["fault"] != "sigint" and alive(e["pid"])]

    # 2. --resume, hang in the step-6 checkpoint save, SIGKILL the driver there
    start = time.monotonic()
    before = complete_checkpoints(folder)
    hang_step = max(max(s) for s in before.values() if max(s) < STEPS) + HANG_AFTER  # its start gets logged first
    assert hang_step <= STEPS, before
    out["hang_step"] = hang_step
    driver = start_driver(folder, study, "--resume", env={FAULT_HANG_ENV: str(hang_step)})
    try:
        deadline = time.monotonic() + 400
        while not list((folder / "tune" / "smoke").glob(f"trial_*/checkpoints/step_{hang_step:06d}/{HANGING_FILE}")):
            assert driver.poll() is None, f"driver 2 exited with {driver.returncode}:\n{driver_output(folder)[-3000:]}"
            assert time.monotonic() < deadline, "the checkpoint hook never hung"
            time.sleep(0.2)
        address = ray_address(folder)
        tree = (worker_pids(address) if address else set()) | descendants(driver.pid) | {driver.pid}
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        driver.kill()
    killed_at = time.monotonic()
    out["sigkill_leftovers"] = {p: cmdline(p) for p in sorted(wait_gone(tree, 60))}  # Ray dies with its driver
    out["sigkill_all_gone_s"] = round(time.monotonic() - killed_at, 1)
    out["reaper_log"] = (folder / "reaper.log").read_text() if (folder / "reaper.log").exists() else ""
    kill_all(set(out["sigkill_leftovers"]))
    pids |= tree
    out["phases"]["driver 2"] = time.monotonic() - start
    out["resumed_from"] = {t: max(s) for t, s in complete_checkpoints(folder).items()}  # what --resume must use
    out["before_driver2"] = {t: max(s) for t, s in before.items()}
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    out["open_after_sigkill"] = sorted(r.info.run_name for r in trial_runs(folder) if r.info.status == "RUNNING")
    report = klrl("report", str(folder), "--include-unfinished", timeout=180)
    out["stale_report"] = (report.returncode, report.stdout + report.stderr)
    out["stale_tags"] = {r.info.run_name: (r.info.status, r.data.tags.get("klrl.stale"))
                         for r in trial_runs(folder)}
    out["stale_section"] = "## Stale runs" in (folder / "report" / "report.md").read_text()

    # 3. --resume to the end
    start = time.monotonic()
    done = klrl("run", str(study), "--run-dir", str(folder), "--resume", timeout=420)
    out["phases"]["driver 3"] = time.monotonic() - start
    out["done"] = done
    out["worker_logs"] = worker_logs(folder)
    stop.set()
    runs = trial_runs(folder)
    out["runs"] = runs
    out["histories"] = histories(client, runs)
    out["stale_left"] = [r.info.run_name for r in client.search_runs(
        [runs[0].info.experiment_id], filter_string="tags.`klrl.stale` = 'true'")] if runs else []
    out["report_written"] = (folder / "report" / "report.md").is_file() and "report:" in done.stdout
    out["leftover_pids"] = sorted(p for p in pids if alive(p))
    kill_all(set(out["leftover_pids"]))
    recovery_s(out["events"], times)
    out["checkpoint_times"] = times
    summary = {k: out[k] for k in ("phases", "events", "resumed_from", "sigkill_leftovers", "sigkill_all_gone_s",
                                   "reaper_log", "leftover_pids")}
    print("fault run:", json.dumps(summary, default=str, indent=1))
    (Path(os.environ["KLRL_RUN_DIR"]) / "faults-summary.json").write_text(json.dumps(summary, default=str))
    yield out


def test_actor_and_trainable_kills_are_retried_and_sigint_leaves_no_run_running(fault_run):
    faults = [e["fault"] for e in fault_run["events"]]
    assert faults == list(DRIVER_ONE_FAULTS), fault_run["events"]
    assert fault_run["driver1_rc"] != 0
    assert fault_run["after_sigint"] and "RUNNING" not in fault_run["after_sigint"].values(), fault_run["after_sigint"]
    assert not fault_run["killed_alive"], fault_run["killed_alive"]


def test_a_sigkilled_drivers_ray_dies_with_it(fault_run):
    """Ray's agents would outlive the raylet by over 60 s; the driver's watcher (orchestrator/reaper.py) stops
    them within seconds, and then exits itself."""
    assert not fault_run["sigkill_leftovers"], fault_run["sigkill_leftovers"]


def test_a_sigkilled_drivers_runs_are_marked_stale(fault_run):
    assert fault_run["open_after_sigkill"], "the killed driver left no run open: nothing to mark"
    code, text = fault_run["stale_report"]
    assert code == 0, text[-3000:]
    for name in fault_run["open_after_sigkill"]:
        assert f"stale run {name} " in text, text[-3000:]
        assert fault_run["stale_tags"][name] == ("KILLED", "true"), fault_run["stale_tags"]
    assert fault_run["stale_section"]


def test_resume_skips_the_half_written_checkpoint_and_starts_after_the_newest_complete_one(fault_run):
    done = fault_run["done"]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "Error handling checkpoint" not in done.stdout + done.stderr
    assert f"step_{fault_run['hang_step']:06d}" in fault_run["worker_logs"] and "skipping half-written checkpoint" in \
        fault_run["worker_logs"]
    unfinished = {t: s for t, s in fault_run["resumed_from"].items() if s < STEPS}
    assert unfinished and all(s < fault_run["hang_step"] for s in unfinished.values()), fault_run["resumed_from"]
    by_trial = {f"trial_{r.data.tags['klrl.trial_id']}": r.info.run_name for r in fault_run["runs"]}
    for trial, step in unfinished.items():
        starts = fault_run["histories"][by_trial[trial]]["time/startup_s"]
        assert max(starts) == step + 1, (trial, step, starts)
    for trial, step in fault_run["before_driver2"].items():  # after SIGINT: driver 2 resumed right there
        if step < STEPS:
            assert step + 1 in fault_run["histories"][by_trial[trial]]["time/startup_s"], (trial, step)
            assert step + 1 < unfinished[trial] + 1, (trial, step, unfinished)  # a start only driver 2 made


def test_every_trial_logs_each_metric_step_exactly_once_and_the_study_ends_clean(fault_run):
    runs = fault_run["runs"]
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status)
                                                                               for r in runs]
    starts_total = 0
    for name, history in fault_run["histories"].items():
        doubled = {key: steps for key, steps in history.items() if len(steps) != len(set(steps))}
        assert not doubled, (name, doubled)
        assert sorted(history["reward/mean"]) == list(range(1, STEPS + 1)), name
        assert sorted(history["klrl/logged_step"]) == list(range(0, STEPS + 1)), name
        assert sorted(history["eval/pass_at_1"]) == [0, 4, 8, 10], name
        starts = sorted(history["time/startup_s"])
        assert starts[0] == 1 and all(s % 2 == 1 for s in starts), (name, starts)  # each right after a checkpoint
        starts_total += len(starts)
    assert starts_total == 2 + 3 + 1 + 1  # first starts, three kills in driver 1, one start per --resume
    assert fault_run["report_written"]
    assert not fault_run["stale_left"], fault_run["stale_left"]
    assert not fault_run["leftover_pids"], fault_run["leftover_pids"]


if os.environ.get("KLRL_SKIP_E2E"):  # pragma: no cover
    pytestmark.append(pytest.mark.skip(reason="KLRL_SKIP_E2E is set"))
