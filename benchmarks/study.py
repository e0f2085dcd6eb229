"""Wall time of a whole study and the per-stage split of its RL steps, read back from MLflow.

    .venv/bin/python benchmarks/study.py search_spaces/miniature.yaml          # run it in a fresh dir, then analyse
    .venv/bin/python benchmarks/study.py --analyse runs/miniature              # analyse a study already run

The study runs exactly as `make run` runs it (`klrl run SPACE --run-dir DIR`, embedded Ray), so its wall
time is the main command's, less the install check. The analysis reads every trial's `time/<stage>_s`
history and `time/startup_s` from the study's MLflow store and prints:
  - each stage's share of the summed step time (rollout, reward, reference, advantage, update, sync,
    metrics), over all steps of all trials;
  - the overheads: weight sync, MLflow logging (`time/track_s`, the previous step's logging), actor
    start-up per trial, and what Ray Tune and the driver add (study wall time minus the trials' own
    time spread over the concurrently running trials).
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
    subprocess.run([str(ROOT / ".venv" / "bin" / "klrl"), "run", str(space), "--run-dir", str(run_dir)],
                   cwd=ROOT, check=True)
    return time.perf_counter() - start


def trial_histories(run_dir: Path) -> list[dict[str, list[float]]]:
    """Per trial run: {metric key: values by step} for the time/* keys."""
    from mlflow.tracking import MlflowClient

    state = json.loads((run_dir / "driver.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    runs = client.search_runs([state["experiment_id"]],
                              filter_string=f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'")
    keys = [f"time/{s}_s" for s in STAGES] + ["time/step_s", "time/track_s", "time/startup_s", "time/eval_s"]
    out = []
    for run in runs:
        history = {}
        for key in keys:
            points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            history[key] = [m.value for m in points]
        history["_wall_s"] = [(run.info.end_time - run.info.start_time) / 1000.0] if run.info.end_time else []
        out.append(history)
    return out


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
        "startup_s_per_trial": [round(v, 1) for v in startup],
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
