"""`klrl run search_spaces/smoke.yaml` as a user types it; a bad study (SIGINT/SIGKILL and --resume:
test_faults.py)."""
from __future__ import annotations

import os
import time

import pytest
from mlflow import MlflowClient

from e2e_helpers import ROOT, SMOKE, free_port, fresh_shell_env, klrl, trial_runs

SMOKE_TRIALS, SMOKE_STEPS = 2, 3


def assert_study_finished(run_dir, n_trials=SMOKE_TRIALS, steps=SMOKE_STEPS):
    runs = trial_runs(run_dir)
    assert len(runs) == n_trials, [(r.info.run_name, r.info.status) for r in runs]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    for run in runs:
        assert run.info.status == "FINISHED", run.info.run_name
        history = client.get_metric_history(run.info.run_id, "reward/mean")
        assert sorted(p.step for p in history) == list(range(1, steps + 1))  # 1-based, each once
        for key in ("time/rollout_s", "time/update_s", "time/sync_s", "perf/tokens_per_s", "kl/exact_reverse",
                    "entropy/token_mean", "eval/pass_at_1", "diversity/embed_cos"):
            assert key in run.data.metrics, key
        assert run.data.params["algorithm.kl_mode"] == run.data.tags["kl_mode"]
        assert {"kl_mode", "kl_estimator", "seed", "task", "git_commit"} <= set(run.data.tags)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "final_metrics.json", "samples"} <= artifacts
    return runs


def test_smoke_study_runs_end_to_end(smoke_study):
    done, run_dir = smoke_study.done, smoke_study.run_dir
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    runs = assert_study_finished(run_dir)
    checkpoints = list((smoke_study.storage / "smoke").glob("trial_*/checkpoints/step_*/learner"))
    assert len(checkpoints) >= SMOKE_TRIALS and not (run_dir / "tune").exists()
    report = klrl("report", str(run_dir), env=fresh_shell_env(smoke_study.home), timeout=120,
                  outside=smoke_study.outside)
    assert report.returncode == 0 and (run_dir / "report" / "report.md").is_file(), report.stderr[-2000:]
    assert sorted(p.relative_to(smoke_study.home) for p in smoke_study.home.rglob("*")) == []  # nothing in $HOME
    assert "klrl: 2/2 trial(s) finished" in done.stdout
    assert "klrl ui" in done.stdout and "report" in done.stdout
    names = {r.info.run_name: r.data.tags for r in runs}
    assert sorted(names) == ["k3·loss s0", "none s0"]  # short names that fit the UI's column
    assert names["none s0"]["kl_estimator"] == "-" and names["k3·loss s0"]["kl_estimator"] == "k3"
    assert names["k3·loss s0"]["klrl.long_name"] == "k3_in_loss"
    assert {tags["git_commit"] for tags in names.values()} == {smoke_study.commit or "unknown"}
    print(f"smoke study wall time: {smoke_study.elapsed_s:.0f}s")


def test_progress_is_one_line_per_trial_step_with_the_study_eta(smoke_study):
    out = smoke_study.done.stdout
    lines = out.splitlines()
    for label in ("[1/2 none s0]", "[2/2 k3·loss s0]"):
        steps = [line for line in lines if line.startswith(f"{label} step ")]
        assert steps and steps[0].startswith(f"{label} step 1/3 reward "), out[-3000:]
        assert steps[-1].startswith(f"{label} step 3/3 "), out[-3000:]
        assert all(" s/step · " in line and "study ETA" in line for line in steps), steps
        assert any(line.startswith(f"{label} finished 3/3 steps in ") for line in lines), out[-3000:]
    assert out.count("== Status ==") == 2  # Tune's table at the start and at the end only
    assert "Result logdir" not in out


def test_bad_study_exits_nonzero_naming_file_and_key(short_run_dir):
    bad = short_run_dir / "bad.yaml"
    bad.write_text((ROOT / SMOKE).read_text().replace("algorithm.kl_mode: in_loss", "algorithm.kl_mode: sideways"))
    done = klrl("run", str(bad), "--run-dir", str(short_run_dir / "never"), timeout=60)
    assert done.returncode == 2
    assert f"{bad}: grid.arms[1] (k3_in_loss): algorithm.kl_mode: unknown value 'sideways'" in done.stderr
    assert not (short_run_dir / "never" / "mlflow.db").exists()  # nothing started
    typo = klrl("run", SMOKE, "--set", "algorithm.kl_coeff=0.1", "--run-dir", str(short_run_dir / "never"),
                timeout=60)
    assert typo.returncode == 2 and "algorithm.kl_coeff: unknown key" in typo.stderr


def test_unreachable_tracking_server_and_ray_fail_fast(short_run_dir):
    start = time.monotonic()
    done = klrl("run", SMOKE, "--run-dir", str(short_run_dir), "--tracking-uri", f"http://127.0.0.1:{free_port()}",
                timeout=120)
    assert done.returncode == 3 and "unreachable" in done.stderr
    done = klrl("run", SMOKE, "--run-dir", str(short_run_dir / "b"), "--address", f"127.0.0.1:{free_port()}",
                timeout=120)
    assert done.returncode == 3 and "Ray cluster at" in done.stderr
    assert time.monotonic() - start < 120


if os.environ.get("KLRL_SKIP_E2E"):  # pragma: no cover - a switch for quick local loops
    pytestmark = pytest.mark.skip(reason="KLRL_SKIP_E2E is set")
