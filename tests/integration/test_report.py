"""The study report on synthetic MLflow studies written here into a real sqlite store.

Study 'synthetic': 3 arms x 3 seeds, 10 steps. Every metric is flat over the last FINAL_WINDOW steps,
so each trial's final value is known exactly. Accuracy: none = {0.80, 0.85, 0.90}, the two KL arms
are identical = {0.40, 0.45, 0.50} -> 'none highest', KL arms not different. Every other metric is the
same across arms -> 'no significant difference'.
Study 'partial': same grid, one trial RUNNING at 6/10 steps and one trial never started.
"""
from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image

from orchestrator import plots
from orchestrator.report import FINAL_WINDOW, write_report
from orchestrator.stats import mean_ci

ARMS = {"none": ("none", "k1"), "in_reward/k1": ("in_reward", "k1"), "in_loss/k3": ("in_loss", "k3")}
SEEDS = (0, 1, 2)
STEPS = 10
ACC = {"none": (0.80, 0.85, 0.90), "in_reward/k1": (0.40, 0.45, 0.50), "in_loss/k3": (0.40, 0.45, 0.50)}
SAME = {"entropy/token_mean": (1.0, 1.1, 1.2), "diversity/embed_cos": (0.5, 0.6, 0.7),
        "diversity/distinct_valid": (2.0, 3.0, 4.0), "diversity/distinct_answers": (3.0, 3.0, 5.0),
        "kl/exact_reverse": (0.01, 0.02, 0.03), "kl/exact_forward": (0.02, 0.02, 0.05),
        "kl/k1_mean": (0.01, 0.02, 0.03), "kl/k2_mean": (0.01, 0.01, 0.02), "kl/k3_mean": (0.01, 0.02, 0.02)}


def make_study(client, name: str, artifact_root, skip=(), running=()) -> str:
    from mlflow.entities import Metric, Param

    exp = client.create_experiment(name, artifact_location=artifact_root.as_uri() if artifact_root else None)
    parent = client.create_run(exp, run_name=name, tags={"klrl.role": "study"}).info.run_id
    for arm, (mode, est) in ARMS.items():
        for i, seed in enumerate(SEEDS):
            if (arm, seed) in skip:
                continue
            # the tags orchestrator/trial.py writes (no `arm` tag: the report derives it)
            tags = {"mlflow.parentRunId": parent, "klrl.role": "trial", "kl_mode": mode, "kl_estimator": est,
                    "seed": str(seed), "task": "palindrome", "axis.algorithm.kl_mode": mode,
                    "axis.run.seed": str(seed), **({"axis.algorithm.kl_estimator": est} if mode != "none" else {})}
            run = client.create_run(exp, run_name=f"{mode}-{est}-s{seed}", tags=tags).info.run_id
            client.log_batch(run, params=[Param("run.steps", str(STEPS)), Param("algorithm.kl_coef", "0.05")])
            n_steps = 6 if (arm, seed) in running else STEPS
            now = int(time.time() * 1000)
            metrics = []
            for step in range(n_steps):
                late = step >= STEPS - FINAL_WINDOW  # early steps differ, so a wrong window would show
                metrics.append(Metric("reward/mean", ACC[arm][i] if late else 0.1, now, step))
                metrics += [Metric(k, v[i] if late else 9.0, now, step) for k, v in SAME.items()]
            client.log_batch(run, metrics=metrics)
            client.set_terminated(run, "RUNNING" if (arm, seed) in running else "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    parents = {"synthetic": make_study(client, "synthetic", root / "artifacts"),
               "partial": make_study(client, "partial", root / "artifacts_partial",
                                     skip={("in_loss/k3", 2)}, running={("in_reward/k1", 1)})}
    return uri, client, parents


@pytest.fixture(scope="module")
def synthetic(store, tmp_path_factory):
    uri, client, parents = store
    out = tmp_path_factory.mktemp("report")
    return write_report("synthetic", uri, out), out, client, parents["synthetic"]


def row(text: str, arm: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {arm} |"))


def test_table_has_known_means_and_cis(synthetic):
    path, _, _, _ = synthetic
    text = path.read_text()
    assert row(text, "none").startswith("| none | 0, 1, 2 | " + mean_ci(ACC["none"]).format() + " |")
    assert "0.85 ± 0.124 (n=3)" in row(text, "none")  # 4.3027 * 0.05 / sqrt(3)
    for arm in ("in_reward/k1", "in_loss/k3"):
        assert f"| {arm} | 0, 1, 2 | 0.45 ± 0.124 (n=3) | 1.1 ± 0.248 (n=3) | 0.6 ± 0.248 (n=3) |" in text


def test_verdicts_and_findings(synthetic):
    text = synthetic[0].read_text()
    acc = next(line for line in text.splitlines() if line.startswith("| final accuracy |"))
    assert "none highest" in acc and "in_reward/k1 lower than none" in acc and "in_loss/k3 lower than none" in acc
    assert "3 seeds per arm" in acc and "Welch t" in acc
    for metric in ("entropy (nats/token)", "cosine similarity", "distinct valid answers", "exact KL reverse",
                   "exact KL forward"):
        verdict = next(line for line in text.splitlines() if line.startswith(f"| {metric} |"))
        assert "no significant difference between arms (Welch t, Holm-adjusted, 3 seeds per arm" in verdict
    findings = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in text.splitlines()
                if line.startswith("| No") or line.startswith("| Entropy")}
    assert findings == {"No consistent diversity differences between arms": "agrees",
                        "Entropy does not separate KL directions": "agrees",
                        "No-KL training reaches the highest training accuracy": "agrees"}
    assert "## Missing or unfinished trials\n\nNone." in text


def test_summary_csv_has_per_trial_finals(synthetic):
    rows = list(csv.DictReader((synthetic[1] / "summary.csv").open()))
    assert len(rows) == 9 and all(r["complete"] == "True" and r["steps_logged"] == "10" for r in rows)
    none1 = next(r for r in rows if r["arm"] == "none" and r["seed"] == "1")
    assert float(none1["final:reward/mean"]) == pytest.approx(0.85)
    assert float(none1["final:kl/exact_forward"]) == pytest.approx(0.02)


def test_pngs_are_images_of_the_expected_size(synthetic):
    _, out, _, _ = synthetic
    w, h = plots.PANEL_PX
    expected = {"accuracy": 1, "entropy": 1, "kl_exact": 2, "kl_estimators": 3, "diversity": 3}
    for stem, panels in expected.items():
        with Image.open(out / f"palindrome_{stem}.png") as img:
            img.verify()
        with Image.open(out / f"palindrome_{stem}.png") as img:
            assert img.format == "PNG" and img.size == (w * panels, h)


def test_report_is_logged_to_the_parent_run(synthetic):
    _, _, client, parent = synthetic
    names = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/summary.csv", "report/palindrome_accuracy.png"} <= names


def test_partial_study_lists_missing_and_unfinished(store, tmp_path):
    uri, _, _ = store
    text = write_report("partial", uri, tmp_path).read_text()
    missing = text.split("## Missing or unfinished trials")[1]
    assert "palindrome / in_reward/k1 / seed 1 (run in_reward-k1-s1" in missing
    assert "status RUNNING, 6/10 steps" in missing
    assert "palindrome / in_loss/k3 / seed 2: no run" in missing
    # the unfinished and the missing trial are left out of the statistics
    assert row(text, "in_reward/k1").startswith("| in_reward/k1 | 0, 2 | 0.45 ± 0.635 (n=2) |")
    assert row(text, "in_loss/k3").startswith("| in_loss/k3 | 0, 1 | 0.425 ± 0.318 (n=2) |")
    assert "seeds per arm: none=3, in_reward/k1=2, in_loss/k3=2" in text


def test_unknown_study_names_the_experiments(store, tmp_path):
    with pytest.raises(ValueError, match="no MLflow experiment.*'partial'"):
        write_report("nope", store[0], tmp_path)


def test_include_unfinished_tabulates_the_running_trial(store, tmp_path):
    text = write_report("partial", store[0], tmp_path, include_unfinished=True, log_artifacts=False).read_text()
    assert row(text, "in_reward/k1").startswith("| in_reward/k1 | 0, 1, 2 |")
    assert "Unfinished trials are included." in text


def test_one_seed_per_arm_says_no_ci_and_not_testable(store, tmp_path):
    uri, client, _ = store
    one = {(arm, seed) for arm in ARMS for seed in SEEDS if seed != 0}
    make_study(client, "one_seed", tmp_path / "artifacts", skip=one)
    text = write_report("one_seed", uri, tmp_path / "out").read_text()
    assert row(text, "none").startswith("| none | 0 | 0.8 (n=1, no CI) |")
    assert "not testable: a t-test needs 2+ seeds per arm (1 seed per arm)" in text
    assert "## Missing or unfinished trials\n\nNone." in text  # a 3 arms x 1 seed grid is full


def test_arm_is_derived_from_kl_settings_and_varying_axes():
    from types import SimpleNamespace

    from orchestrator.report import Trial, _suffix_axes, arm_name

    assert [arm_name("none", "k3"), arm_name("in_reward", "k1"), arm_name("in_loss", "k3", {"a.kl_coef": "0.1"})] \
        == ["none", "in_reward/k1", "in_loss/k3 kl_coef=0.1"]

    def run(tags, params=None):
        return SimpleNamespace(data=SimpleNamespace(tags=tags, params=params or {}))

    # axis tags as orchestrator/trial.py writes them: seed and kl_mode never split an arm, a kl_coef
    # axis splits the KL arms but not the none arm (which has no KL term).
    def axes(mode, coef, seed):
        return {"axis.algorithm.kl_mode": mode, "axis.algorithm.kl_coef": coef, "axis.run.seed": seed}

    runs = {"0": run(axes("in_reward", "0.05", "0")), "1": run(axes("in_reward", "0.1", "1")),
            "2": run(axes("none", "0.1", "0")),
            "3": run({"arm": "mine"}),
            "4": run({}, {"algorithm.kl_coef": "0.05"}), "5": run({}, {"algorithm.kl_coef": "0.2"})}
    trials = [Trial(str(i), "r", task, arm, "0", "FINISHED", 10) for i, (task, arm) in enumerate(
        [("p", "in_reward/k1"), ("p", "in_reward/k1"), ("p", "none"), ("p", "mine"),
         ("d", "in_loss/k3"), ("d", "in_loss/k3")])]
    _suffix_axes(trials, runs)
    assert [t.arm for t in trials] == ["in_reward/k1 kl_coef=0.05", "in_reward/k1 kl_coef=0.1", "none", "mine",
                                       "in_loss/k3 kl_coef=0.05", "in_loss/k3 kl_coef=0.2"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts), stopped afterwards."""
    root = tmp_path_factory.mktemp("server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "art")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(root / "server.log").open("w"),
                            start_new_session=True)  # own process group: its uvicorn worker goes with it
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_report_through_an_mlflow_server(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    parent = make_study(client, "served", None, skip={("in_loss/k3", 1)})
    text = write_report("served", mlflow_server, tmp_path).read_text()
    assert "in_reward/k1 lower than none" in text and "palindrome / in_loss/k3 / seed 1: no run" in text
    assert "report/report.md" in {a.path for a in client.list_artifacts(parent, "report")}


def test_final_is_the_mean_over_the_last_steps_or_the_last_sparse_point():
    from orchestrator.report import Trial

    t = Trial("r", "r", "p", "none", "0", "FINISHED", 20, history={
        "reward/mean": (list(range(20)), [0.0] * 15 + [1.0, 2.0, 3.0, 4.0, 5.0]),
        "diversity/embed_cos": ([4, 9, 14, 19], [0.1, 0.2, 0.3, 0.4]),  # diversity_every=5
        "eval/pass_at_1": ([9], [0.7])})  # eval_every=10 on a trial that stopped logging eval early
    assert t.final("reward/mean") == pytest.approx(3.0)
    assert t.final("diversity/embed_cos") == pytest.approx(0.4)
    assert t.final("eval/pass_at_1") == pytest.approx(0.7)
    assert t.steps_logged == 20 and t.complete
