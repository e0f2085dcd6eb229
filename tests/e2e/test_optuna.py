"""An Optuna search through Tune's OptunaSearch, end to end: sampled values reach the trials' configs."""
from __future__ import annotations

import yaml
from mlflow import MlflowClient

from e2e_helpers import ROOT, SMOKE, klrl, trial_runs


def test_optuna_search_samples_in_range_and_tracks_each_trial(short_run_dir):
    study = yaml.safe_load((ROOT / SMOKE).read_text())
    study.update(name="optuna_smoke", grid={"run.seed": [0]},
                 optuna={"metric": "reward/mean", "mode": "max", "num_samples": 2, "seed": 0,
                         "params": {"algorithm.kl_coef": {"loguniform": [1.0e-3, 1.0e-1]}}},
                 tune={"max_failures": 0, "max_concurrent_trials": 1})
    study["base"]["algorithm"].update(kl_mode="in_reward", kl_estimator="k1")
    study["base"]["run"].update(steps=2, eval_every=0, checkpoint_every=2, samples_every=2, diversity_every=2)
    space = short_run_dir / "optuna_smoke.yaml"
    space.write_text(yaml.safe_dump(study))
    done = klrl("run", str(space), "--run-dir", str(short_run_dir / "run"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    runs = trial_runs(short_run_dir / "run", experiment="optuna_smoke")
    coefs = sorted(float(r.data.params["algorithm.kl_coef"]) for r in runs)
    assert len(coefs) == 2 and len(set(coefs)) == 2 and all(1e-3 <= c <= 1e-1 for c in coefs)
    client = MlflowClient(tracking_uri=f"sqlite:///{short_run_dir / 'run' / 'mlflow.db'}")
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["axis.algorithm.kl_coef"] == run.data.params["algorithm.kl_coef"]
        assert len(client.get_metric_history(run.info.run_id, "reward/mean")) == 2
    assert "kl_coef=" in (short_run_dir / "run" / "report" / "report.md").read_text()
