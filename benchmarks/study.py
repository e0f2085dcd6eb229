"""Wall time of a whole study and the per-stage split of its RL steps, read back from MLflow.

    .venv/bin/python benchmarks/study.py search_spaces/miniature.yaml          # run it in a fresh dir, then analyse
    .venv/bin/python benchmarks/study.py --analyse runs/miniature              # analyse a study already run

The study runs exactly as `make run` runs it (`klrl run SPACE --run-dir DIR`, embedded Ray), so its wall
time is the main command's, less the install check. The analysis reads every trial's `time/<stage>_s`
history and its start-up metrics from the study's MLflow store and prints:
  - each stage's share of the summed step time (rollout, reward, reference, advantage, update, sync,
    metrics), over all steps of all trials;
  - the start-up split: a start on fresh engines (vLLM + DeepSpeed built: what every trial paid before
    engines were reused) against a start on engines reused from the previous trial (reset), each with
    its engine part (`time/engines_s`), and the gap Tune leaves between one trial's end and the next's
    start (it resets or replaces the trainable process there);
  - the overheads: weight sync, tracking and checkpoints (`time/track_s`, the previous step's), eval,
    and what Ray Tune and the driver add (study wall time minus the trials' own time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers import environment  # noqa: E402

STAGES = ("rollout", "reward", "reference", "advantage", "update", "sync", "metrics")


def run_study(space: Path, run_dir: Path) -> float:
    if (run_dir / "tune").exists():
        sys.exit(f"{run_dir} already holds a study; pass --analyse {run_dir} or another --run-dir")
    start = time.perf_counter()
    klrl = Path(sys.executable).with_name("klrl")  # the environment this script runs in
    subprocess.run([str(klrl), "run", str(space), "--run-dir", str(run_dir)], cwd=ROOT, check=True)
    return time.perf_counter() - start


def trial_histories(run_dir: Path) -> list[dict[str, list[float]]]:
    """Per trial run: {metric key: values by step} for the time/* keys."""
    from mlflow.tracking import MlflowClient

    state = json.loads((run_dir / "driver.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    runs = client.search_runs([state["experiment_id"]],
                              filter_string=f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'")
    keys = [f"time/{s}_s" for s in STAGES] + ["time/step_s", "time/track_s", "time/startup_s", "time/eval_s",
                                              "time/engines_s", "engines/reused"]
    out = []
    for run in sorted(runs, key=lambda r: r.info.start_time):
        history = {}
        for key in keys:
            points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            history[key] = [m.value for m in points]
        history["_wall_s"] = [(run.info.end_time - run.info.start_time) / 1000.0] if run.info.end_time else []
        history["_span_ms"] = [run.info.start_time, run.info.end_time or run.info.start_time]
        out.append(history)
    return out


def startup_split(trials: list[dict[str, list[float]]]) -> dict:
    """Start-ups on fresh against reused engines (each start logs time/startup_s, time/engines_s and
    engines/reused once, with its first step), and Tune's gap between consecutive trials."""
    starts = [(reused, startup, engines) for t in trials
              for reused, startup, engines in zip(t["engines/reused"], t["time/startup_s"], t["time/engines_s"])]
    split = {}
    for name, flag in (("fresh", 0.0), ("reused", 1.0)):
        chosen = [(s, e) for r, s, e in starts if r == flag]
        split[name] = {"starts": len(chosen),
                       "startup_s_median": statistics.median(s for s, _ in chosen) if chosen else None,
                       "engines_s_median": statistics.median(e for _, e in chosen) if chosen else None}
    gaps = [(b["_span_ms"][0] - a["_span_ms"][1]) / 1000.0 for a, b in zip(trials, trials[1:])]
    split["gap_between_trials_s_median"] = statistics.median(gaps) if gaps else None
    return split


def analyse(run_dir: Path, study_wall_s: float | None) -> dict:
    trials = trial_histories(run_dir)
    stage_s = {s: sum(sum(t[f"time/{s}_s"]) for t in trials) for s in STAGES}
    steps_s = sum(stage_s.values())
    step_times = [v for t in trials for v in t["time/step_s"]]
    track_s = sum(sum(t["time/track_s"]) for t in trials)
    startup = [v for t in trials for v in t["time/startup_s"]]
    eval_s = sum(sum(t["time/eval_s"]) for t in trials)
    trial_wall = [w for t in trials for w in t["_wall_s"]]
    result = {
        "trials": len(trials), "steps": len(step_times),
        "step_s_median": statistics.median(step_times) if step_times else None,
        "stage_share": {s: stage_s[s] / steps_s for s in STAGES} if steps_s else {},
        "startup_s_per_trial": [round(v, 2) for v in startup],
        "startup_split": startup_split(trials),
        "trial_wall_s": [round(v, 1) for v in trial_wall],
        "share_of_trial_time": {
            "steps": steps_s / sum(trial_wall), "actor_startup": sum(startup) / sum(trial_wall),
            "eval": eval_s / sum(trial_wall), "mlflow_logging": track_s / sum(trial_wall),
            "sync": stage_s["sync"] / sum(trial_wall),
        } if trial_wall else {},
    }
    if study_wall_s is not None:
        result["study_wall_s"] = study_wall_s
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("space", nargs="?", default="search_spaces/miniature.yaml")
    parser.add_argument("--run-dir", default=None, help="fresh run dir (default runs/bench_study/<stamp>)")
    parser.add_argument("--analyse", metavar="RUN_DIR", help="only analyse a study already run in RUN_DIR")
    parser.add_argument("--json", help="append the result as one JSON line to this file")
    args = parser.parse_args()
    environment.configure(environment.run_dir(ROOT / "runs"))  # caches in runs/, not $HOME
    if args.analyse:
        run_dir, wall = Path(args.analyse).resolve(), None
    else:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        run_dir = Path(args.run_dir or ROOT / "runs" / "bench_study" / stamp).resolve()
        wall = run_study(Path(args.space).resolve(), run_dir)
    result = analyse(run_dir, wall)
    result.update({"run_dir": str(run_dir), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                   "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
                   "load_avg_1m_at_end": os.getloadavg()[0]})
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
