"""The MLflow adapter against the real thing: a sqlite store, then a real `mlflow server` on 127.0.0.1
serving the same runs over REST (started here, bounded waits, always terminated)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.tracking import PARENT_TAG, ROLE_TAG, TrackingError, check_reachable, default_uri, make_tracker

SERVER_START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def study_store(tmp_path):
    """A sqlite store holding one study: a parent run and two finished child runs with 3 steps each."""
    uri = default_uri(tmp_path)
    check_reachable(uri)
    tracker = make_tracker(uri)
    exp = tracker.ensure_experiment("study_x", artifact_dir=tmp_path / "mlartifacts")
    assert tracker.ensure_experiment("study_x") == exp  # idempotent: the driver may call it on resume
    parent = tracker.start_run(exp, "study_x", {ROLE_TAG: "study"})
    children = []
    for seed, mode in ((0, "none"), (1, "in_loss")):
        child = tracker.start_run(exp, f"{mode} seed={seed}", {"kl_mode": mode, "seed": str(seed)}, parent_id=parent)
        params = {f"p.{i}": i for i in range(150)}  # more than one log_batch holds
        tracker.log_params(child, {**params, "algorithm.kl_mode": mode, "run.seed": seed})
        for step in range(3):
            tracker.log_metrics(child, {"reward/mean": 0.1 * step + seed, "eval/pass@1": 0.5}, step=step)
        tracker.log_text(child, "algorithm:\n  kl_mode: none\n", "config.yaml")
        tracker.log_table(child, [{"step": 2, "prompt": "p", "response": "aba", "reward": 1.0}],
                          "samples/step_00003.json")
        tracker.end_run(child, "FINISHED")
        children.append(child)
    return uri, tmp_path, exp, parent, children


def check_study(uri: str, parent: str, children: list[str]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("study_x")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    assert sorted(r.info.run_id for r in runs) == sorted(children)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["algorithm.kl_mode"] == run.data.tags["kl_mode"]
        assert len(run.data.params) == 152
        history = client.get_metric_history(run.info.run_id, "reward/mean")
        assert [p.step for p in sorted(history, key=lambda p: p.step)] == [0, 1, 2]
        assert "eval/pass_at_1" in run.data.metrics
        files = {a.path for a in client.list_artifacts(run.info.run_id)} | \
            {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
        assert {"config.yaml", "samples/step_00003.json"} <= files
        table = json.loads(Path(client.download_artifacts(run.info.run_id, "samples/step_00003.json",
                                                          dst_path=None)).read_text())
        assert table["columns"][:3] == ["step", "prompt", "response"] and table["data"][0][2] == "aba"


def test_sqlite_store_holds_parent_children_params_metrics_artifacts(study_store):
    uri, tmp_path, exp, parent, children = study_store
    check_study(uri, parent, children)
    tracker = make_tracker(uri)
    assert tracker.find_run(exp, {"kl_mode": "in_loss"}) == children[1]
    assert sorted(tracker.children(exp, parent)) == sorted((c, "FINISHED") for c in children)
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts live in the run dir, not ./mlruns


def test_open_children_are_ended_by_the_driver(tmp_path):
    tracker = make_tracker(default_uri(tmp_path))
    exp = tracker.ensure_experiment("s")
    parent = tracker.start_run(exp, "s", {})
    done = tracker.start_run(exp, "a", {}, parent_id=parent)
    tracker.end_run(done)
    hung = tracker.start_run(exp, "b", {}, parent_id=parent)
    assert tracker.end_open_children(exp, parent, "KILLED") == 1
    assert (tracker.status(done), tracker.status(hung)) == ("FINISHED", "KILLED")
    tracker.reopen(hung)  # --resume reopens a killed trial's run
    assert tracker.status(hung) == "RUNNING"


def test_unreachable_server_fails_fast():
    start = time.monotonic()
    with pytest.raises(TrackingError, match=r"127.0.0.1:\d+ is unreachable"):
        check_reachable(f"http://127.0.0.1:{free_port()}", timeout_s=3)
    assert time.monotonic() - start < 10


def test_mlflow_server_serves_the_same_runs_over_rest(study_store):
    uri, tmp_path, exp, parent, children = study_store
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
    server = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", uri,
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not come up in {SERVER_START_TIMEOUT_S}s: "
                            f"{server.stderr.read().decode()[-2000:] if server.poll() is not None else 'timeout'}")
            time.sleep(0.5)
        check_reachable(url)
        check_study(url, parent, children)
        # Writes through the server land in the same store.
        tracker = make_tracker(url)
        run = tracker.start_run(exp, "via-rest", {}, parent_id=parent)
        tracker.log_metrics(run, {"reward/mean": 1.0}, step=0)
        tracker.end_run(run)
        assert make_tracker(uri).status(run) == "FINISHED"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's gunicorn/uvicorn workers are in its group
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
