"""The study report on synthetic MLflow studies written here into a real sqlite store (and a real server).

Study 'synthetic': 3 arms x 3 seeds, 10 steps logged 1-based, eval (pass@k, coverage) at steps 0 (π_ref,
the same in every trial), 5 and 10. Every per-step metric is flat over the last FINAL_WINDOW steps, so each
trial's final value is known exactly. Accuracy: none = {0.80, 0.85, 0.90}, in_reward/k1 = {0.40, 0.47, 0.50},
in_loss/k3 = {0.40, 0.45, 0.50} -> both KL arms significantly lower than none (paired), k1 vs k3 not. Every
other per-step metric is the same in every arm -> not significant, and with 3 seeds the "no difference"
findings are inconclusive (too little power), never "agrees".
Study 'partial': same grid, one trial RUNNING at 6/10 steps, one never started, one FAILED and one
tagged klrl.failure.
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
from orchestrator.report import write_report
from orchestrator.stats import mean_ci
from orchestrator.study_runs import FINAL_WINDOW, Trial

ARMS = {"none": ("none", "k1"), "in_reward/k1": ("in_reward", "k1"), "in_loss/k3": ("in_loss", "k3")}
SEEDS = (0, 1, 2)
STEPS = 10
EVAL_STEPS = (0, 5, 10)
ACC = {"none": (0.80, 0.85, 0.90), "in_reward/k1": (0.40, 0.47, 0.50), "in_loss/k3": (0.40, 0.45, 0.50)}
SAME = {"entropy/token_mean": (1.0, 1.1, 1.2), "diversity/embed_cos": (0.5, 0.6, 0.7),
        "diversity/distinct_valid": (2.0, 3.0, 4.0), "diversity/distinct_answers": (3.0, 3.0, 5.0),
        "kl/exact_reverse": (0.01, 0.02, 0.03), "kl/exact_forward": (0.02, 0.02, 0.05),
        "kl/k1_mean": (0.01, 0.02, 0.03), "kl/k2_mean": (0.01, 0.01, 0.02), "kl/k3_mean": (0.01, 0.02, 0.02)}
REF_EVAL = {"eval/pass_at_1": 0.3, "eval/pass_at_2": 0.45, "eval/pass_at_4": 0.6, "eval/answer_coverage": 1.0,
            "eval/answer_novelty": 0.0}
FINAL_EVAL = {  # at the last eval step; step 5 logs 0.0 so that a wrong "final" would show
    "eval/pass_at_1": {"none": (0.4, 0.45, 0.5), "in_reward/k1": (0.5, 0.55, 0.6), "in_loss/k3": (0.5, 0.5, 0.6)},
    "eval/pass_at_2": {"none": (0.5, 0.55, 0.6), "in_reward/k1": (0.7, 0.75, 0.8), "in_loss/k3": (0.6, 0.7, 0.8)},
    "eval/pass_at_4": {"none": (0.7, 0.75, 0.8), "in_reward/k1": (0.9, 0.95, 1.0), "in_loss/k3": (0.8, 0.85, 0.9)},
    "eval/answer_coverage": {"none": (0.5, 0.6, 0.7), "in_reward/k1": (0.9, 0.95, 1.0), "in_loss/k3": (0.8, 0.85, 0.9)},
    "eval/answer_novelty": {"none": (0.2, 0.2, 0.3), "in_reward/k1": (0.1, 0.1, 0.1), "in_loss/k3": (0.1, 0.2, 0.1)},
}


def trial_metrics(arm: str, i: int, n_steps: int) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    out = []
    for step in range(1, n_steps + 1):  # 1-based: step s = after s updates
        late = step > STEPS - FINAL_WINDOW  # early steps differ, so a wrong window would show
        out.append(Metric("reward/mean", ACC[arm][i] if late else 0.1, now, step))
        out += [Metric(k, v[i] if late else 9.0, now, step) for k, v in SAME.items()]
    for step in (s for s in EVAL_STEPS if s <= n_steps):
        for key, ref in REF_EVAL.items():
            value = ref if step == 0 else FINAL_EVAL[key][arm][i] if step == STEPS else 0.0
            out.append(Metric(key, value, now, step))
    return out


def make_study(client, name: str, artifact_root, skip=(), running=(), failed=(), failure_tag=()) -> str:
    from mlflow.entities import Param

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
            if (arm, seed) in failure_tag:
                tags["klrl.failure"] = "non-finite kl/exact_reverse at step 7"
            run = client.create_run(exp, run_name=f"{mode}-{est}-s{seed}", tags=tags).info.run_id
            client.log_batch(run, params=[Param("run.steps", str(STEPS)), Param("algorithm.kl_coef", "0.05")])
            client.log_batch(run, metrics=trial_metrics(arm, i, 6 if (arm, seed) in running else STEPS))
            status = "RUNNING" if (arm, seed) in running else "FAILED" if (arm, seed) in failed else "FINISHED"
            client.set_terminated(run, status)
    client.set_terminated(parent, "FINISHED")
    return parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    parents = {"synthetic": make_study(client, "synthetic", root / "artifacts"),
               "partial": make_study(client, "partial", root / "artifacts_partial", skip={("in_loss/k3", 2)},
                                     running={("in_reward/k1", 1)}, failed={("none", 2)},
                                     failure_tag={("in_reward/k1", 2)})}
    return uri, client, parents


@pytest.fixture(scope="module")
def synthetic(store, tmp_path_factory):
    uri, client, parents = store
    out = tmp_path_factory.mktemp("report")
    return write_report("synthetic", uri, out), out, client, parents["synthetic"]


def row(text: str, first: str, *contains: str) -> str:
    """The first table row whose first cell is `first` and that contains every string of `contains`."""
    return next(line for line in text.splitlines()
                if line.startswith(f"| {first} |") and all(c in line for c in contains))


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_arms_table_has_known_means_and_clipped_cis(synthetic):
    text = synthetic[0].read_text()
    none = cells(row(text, "none", "0, 1, 2"))
    assert none[:3] == ["none", "0, 1, 2", mean_ci(ACC["none"]).format()]
    assert none[2] == "0.85 ± 0.124 (n=3)"  # 4.3027 * 0.05 / sqrt(3)
    header = cells(row(text, "arm"))
    assert header[2:6] == ["final accuracy (`reward/mean`)", "eval pass@1 (`eval/pass_at_1`)",
                           "eval pass@4 (`eval/pass_at_4`)", "answer coverage (`eval/answer_coverage`)"]
    k1 = dict(zip(header, cells(row(text, "in_reward/k1", "0, 1, 2"))))
    # pass@4 0.9, 0.95, 1.0: 0.95 ± 0.124 reaches past 1, so the interval is clipped at 1
    assert k1["eval pass@4 (`eval/pass_at_4`)"] == "0.95 [0.826, 1] (n=3)"
    assert k1["eval pass@1 (`eval/pass_at_1`)"] == "0.55 ± 0.124 (n=3)"  # the last eval step, not step 5
    assert k1["entropy (nats/token) (`entropy/token_mean`)"] == "1.1 ± 0.248 (n=3)"


def test_paired_comparisons_and_verdicts(synthetic):
    text = synthetic[0].read_text()
    acc = {cells(line)[1]: cells(line) for line in text.splitlines() if line.startswith("| final accuracy (")}
    assert set(acc) == {"in_reward/k1 − none", "in_loss/k3 − none", "in_reward/k1 − in_loss/k3"}
    k1 = acc["in_reward/k1 − none"]  # d = -0.40, -0.38, -0.40: t = -59, p = 0.0003
    assert k1[2] == "3" and k1[3].startswith("-0.393 [") and k1[7] == "**in_reward/k1 lower than none** (p<0.001)"
    assert acc["in_loss/k3 − none"][7].startswith("**in_loss/k3 lower than none**")  # d = -0.4 on every seed
    assert acc["in_reward/k1 − in_loss/k3"][7] == "not significant"  # d = 0, 0.02, 0: t = 1, p = 0.42
    entropy = row(text, "entropy (nats/token) (`entropy/token_mean`)", "in_reward/k1 − none")
    assert cells(entropy)[3:5] == ["0 [0, 0]", "0"] and cells(entropy)[7] == "not significant"
    findings = {cells(line)[0]: cells(line)[3] for line in text.splitlines()
                if line.startswith("| No") or line.startswith("| Entropy")}
    assert findings["No-KL training reaches the highest training accuracy"] == "agrees"
    for finding in ("No consistent diversity differences between arms", "Entropy does not separate KL directions"):
        assert findings[finding].startswith("inconclusive: no significant difference, but only ")
        assert "against an effect d_z = ±1 with 3 seeds (14 needed for 80%)" in findings[finding]
    assert "agrees" not in findings["No consistent diversity differences between arms"]
    assert "Underpowered" not in text


def test_pass_at_k_table_against_pi_ref(synthetic):
    text = synthetic[0].read_text()
    section = text.split("### pass@k at the last eval step, against π_ref")[1]
    assert cells(row(section, "policy"))[1:] == ["pass@1", "pass@2", "pass@4"]
    assert cells(row(section, "π_ref (step 0)")) == ["π_ref (step 0)", "0.3", "0.45", "0.6"]
    assert cells(row(section, "none"))[3] == "0.75 ± 0.124 (n=3)"
    assert "differs between trials" not in section


def test_csvs_have_per_trial_finals_and_comparisons(synthetic):
    rows = list(csv.DictReader((synthetic[1] / "summary.csv").open()))
    assert len(rows) == 9 and all(r["complete"] == "True" and r["steps_logged"] == "10" for r in rows)
    none1 = next(r for r in rows if r["arm"] == "none" and r["seed"] == "1")
    assert float(none1["final:reward/mean"]) == pytest.approx(0.85)
    assert float(none1["final:kl/exact_forward"]) == pytest.approx(0.02)
    assert float(none1["final:eval/pass_at_4"]) == pytest.approx(0.75)
    comps = list(csv.DictReader((synthetic[1] / "comparisons.csv").open()))
    k1 = next(r for r in comps if r["metric"] == "final accuracy" and r["arm"] == "in_reward/k1" and r["ref"] == "none")
    assert float(k1["mean_diff"]) == pytest.approx(-0.39333, abs=1e-4) and k1["significant"] == "True"
    assert float(k1["p_signflip"]) == pytest.approx(0.25)  # 3 pairs: 2 of 8 sign patterns


def test_pngs_are_images_of_the_expected_size(synthetic):
    _, out, _, _ = synthetic
    w, h = plots.PANEL_PX
    expected = {"accuracy": 2, "entropy": 1, "kl_exact": 2, "kl_estimators": 3, "diversity": 3, "coverage": 2,
                "pass_at_k": 1}
    for stem, panels in expected.items():
        with Image.open(out / f"palindrome_{stem}.png") as img:
            img.verify()
        with Image.open(out / f"palindrome_{stem}.png") as img:
            assert img.format == "PNG" and img.size == (w * panels, h)


def test_every_panel_has_a_y_label_with_a_unit():
    for _, panels in plots.FIGURES:
        for key, _, ylabel in panels:
            assert "(" in ylabel and ylabel.endswith(")"), key


def test_report_is_logged_to_the_parent_run(synthetic):
    _, _, client, parent = synthetic
    names = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/summary.csv", "report/comparisons.csv", "report/palindrome_accuracy.png",
            "report/palindrome_pass_at_k.png"} <= names


def test_partial_study_lists_failed_unfinished_and_missing(store, tmp_path):
    uri, _, _ = store
    text = write_report("partial", uri, tmp_path).read_text()
    failed = text.split("## Failed trials")[1].split("## Unfinished or missing trials")[0]
    assert "palindrome / none / seed 2 (run none-k1-s2" in failed and "status FAILED" in failed
    assert "palindrome / in_reward/k1 / seed 2 (run in_reward-k1-s2" in failed
    assert "klrl.failure: non-finite kl/exact_reverse at step 7" in failed
    missing = text.split("## Unfinished or missing trials")[1]
    assert "palindrome / in_reward/k1 / seed 1 (run in_reward-k1-s1" in missing
    assert "status RUNNING, 6/10 steps" in missing
    assert "palindrome / in_loss/k3 / seed 2: no run" in missing
    assert "none / seed 2" not in missing  # failed, not unfinished
    # only complete, non-failed trials give final values: k1 has seed 0 alone, so the task is underpowered
    assert cells(row(text, "in_reward/k1", "| 0 |"))[2] == "0.4 (n=1, no CI)"
    assert cells(row(text, "none", "| 0, 1 |"))[2] == "0.825 [0.507, 1] (n=2)"  # 0.825 ± 0.318, clipped at 1
    assert "**Underpowered: fewer than 3 seeds per arm (none: 2, in_reward/k1: 1, in_loss/k3: 2).**" in text
    assert "lower than" not in text and "p=" not in text  # no verdict, no p-value
    assert "untestable (fewer than 3 seeds per arm)" in text


def test_unknown_study_names_the_experiments(store, tmp_path):
    with pytest.raises(ValueError, match="no MLflow experiment.*'partial'"):
        write_report("nope", store[0], tmp_path)


def test_include_unfinished_tabulates_the_running_trial_never_the_failed(store, tmp_path):
    text = write_report("partial", store[0], tmp_path, include_unfinished=True, log_artifacts=False).read_text()
    assert cells(row(text, "in_reward/k1", "| 0, 1 |"))[1] == "0, 1"  # running seed 1 in, failed seed 2 out
    assert "here unfinished trials are included" in text


def test_one_seed_per_arm_says_no_ci_and_underpowered(store, tmp_path):
    uri, client, _ = store
    one = {(arm, seed) for arm in ARMS for seed in SEEDS if seed != 0}
    make_study(client, "one_seed", tmp_path / "artifacts", skip=one)
    text = write_report("one_seed", uri, tmp_path / "out").read_text()
    assert cells(row(text, "none", "| 0 |"))[2] == "0.8 (n=1, no CI)"
    assert "**Underpowered: fewer than 3 seeds per arm" in text
    assert "No paired comparison: no two arms share two or more seeds." in text and "p=" not in text
    assert "## Unfinished or missing trials\n\nNone." in text  # a 3 arms x 1 seed grid is full


def test_arm_is_derived_from_kl_settings_and_varying_axes():
    from types import SimpleNamespace

    from orchestrator.study_runs import _suffix_axes, arm_name

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


def test_comparison_pairs():
    from orchestrator.report import comparison_pairs

    assert comparison_pairs(["none", "in_reward/k1", "in_loss/k3"]) == [
        ("in_reward/k1", "none"), ("in_loss/k3", "none"), ("in_reward/k1", "in_loss/k3")]
    assert comparison_pairs(["none", "in_loss/k3 kl_coef=5"]) == [("in_loss/k3 kl_coef=5", "none")]
    assert comparison_pairs(["in_reward/k1 kl_coef=0.1", "in_loss/k3 kl_coef=0.1", "in_loss/k3 kl_coef=1"]) == [
        ("in_loss/k3 kl_coef=0.1", "in_reward/k1 kl_coef=0.1"), ("in_loss/k3 kl_coef=1", "in_reward/k1 kl_coef=0.1"),
        ("in_loss/k3 kl_coef=1", "in_loss/k3 kl_coef=0.1")]


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
    assert "palindrome / in_loss/k3 / seed 1: no run" in text
    assert "| none | 0, 1, 2 | 0.85 ± 0.124 (n=3) |" in text and "**Underpowered" in text  # in_loss/k3 has 2 seeds
    assert "report/report.md" in {a.path for a in client.list_artifacts(parent, "report")}


def test_final_is_the_window_mean_or_the_last_eval_step_never_pi_ref():
    t = Trial("r", "r", "p", "none", "0", "FINISHED", 20, history={
        "reward/mean": (list(range(1, 21)), [0.0] * 15 + [1.0, 2.0, 3.0, 4.0, 5.0]),
        "diversity/embed_cos": ([5, 10, 15, 20], [0.1, 0.2, 0.3, 0.4]),  # diversity_every=5
        "eval/pass_at_1": ([0, 10, 20], [0.9, 0.7, 0.6]),  # step 0 = π_ref
        "eval/pass_at_2": ([0, 10], [0.9, 0.8])})  # a trial that stopped logging eval early
    assert t.final("reward/mean") == pytest.approx(3.0)
    assert t.final("diversity/embed_cos") == pytest.approx(0.4)
    assert t.final("eval/pass_at_1") == pytest.approx(0.6)  # the last eval step, not a window mean
    assert t.final("eval/pass_at_2") == pytest.approx(0.8) and t.ref("eval/pass_at_2") == 0.9
    only_ref = Trial("r", "r", "p", "none", "0", "FINISHED", 20, history={"eval/pass_at_1": ([0], [0.9])})
    assert only_ref.final("eval/pass_at_1") != only_ref.final("eval/pass_at_1")  # NaN: π_ref is no final
    assert t.steps_logged == 20 and t.complete and not t.failed
    tagged = Trial("r", "r", "p", "none", "0", "FINISHED", 20, history=t.history, failure="loss is nan")
    assert tagged.failed and not tagged.complete
