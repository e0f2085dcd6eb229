"""A study across two Ray nodes on this machine: learner on one node, rollout engine on the other.

The module's cluster (shared by its tests): a head started with `ray start --head` holding custom resource
`node_a`, a second node joined with `ray start --address=...` holding `node_b`, each with its own temp dir
(so its processes are found by that dir and only they are stopped, never with `ray stop`), 1 CPU each;
a real `mlflow server` on 127.0.0.1 (sqlite backend, artifacts in the test dir); a storage path that both
nodes see (one machine), declared with --shared-storage. The smoke study runs against it with
`learner.node_resource=node_a` and `rollout.node_resource=node_b`. In object_store mode the second node's
raylet is killed mid-trial (after its first checkpoint) and the node restarted once the head has
marked it dead; the trial must resume from that checkpoint and MLflow hold each step exactly once.
What ran where and when is written to runs/test/e2e/two_nodes_timeline.json.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from e2e_helpers import KLRL, ROOT, SMOKE, free_port, kill_head, processes_under, ray_cli, short_tmpdir, start_ray_head
from workers import environment

STUDY_TIMEOUT_S = 600
# Checkpoints every 4 steps: the fault hits after the step-4 checkpoint, with 12 steps (~1-3 s on 2 cores) left to
# hit, and the retry resumes from the newest checkpoint before it. ~0.1 s per step: more steps cost little.
STEPS, CHECKPOINT_EVERY = 16, 4
PIN = ["--set", "learner.node_resource=node_a", "--set", "rollout.node_resource=node_b"]
LOGGED_STEP = "klrl/logged_step"

if os.environ.get("KLRL_SKIP_E2E"):  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="KLRL_SKIP_E2E is set")


class Timeline:
    """Seconds since the cluster started, and what happened then (kept for the report)."""

    def __init__(self):
        self.start, self.events = time.monotonic(), []

    def __call__(self, what: str, **details) -> None:
        self.events.append({"t_s": round(time.monotonic() - self.start, 1), "event": what, **details})

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.events, indent=1, default=str))


class TwoNodes:
    """The test's cluster and MLflow server, and how to stop exactly what it started."""

    def __init__(self, base: Path, env: dict, timeline: Timeline):
        self.base, self.env, self.timeline = base, env, timeline
        self.temp_a = environment.ray_temp_dir(base / "a")
        self.temp_b = environment.ray_temp_dir(base / "b")
        self.gcs = self.dash = self.mlflow_port = 0
        self.mlflow: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def start_head(self) -> None:
        start, self.gcs, self.dash = start_ray_head(self.temp_a, self.env, "--num-cpus", "1", "--node-ip-address",
                                                    "127.0.0.1", "--resources", '{"node_a": 1}')
        assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]

    def start_node_b(self) -> None:
        ports = [arg for flag in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                                  "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                  "--runtime-env-agent-port") for arg in (flag, str(free_port()))]
        start = ray_cli("start", "--address", self.address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                        "--resources", '{"node_b": 1}', "--temp-dir", str(self.temp_b), "--disable-usage-stats",
                        *ports, env=self.env)
        assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
        self.wait_for(lambda: self.node_ids("node_b", alive=True), "node_b to join", 60)
        self.timeline("node_b joined", node_id=self.node_ids("node_b", alive=True)[0][:12])

    def start_mlflow(self) -> None:
        self.mlflow_port = free_port()
        store = self.base / "mlflow_server"
        store.mkdir()
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        self.mlflow = subprocess.Popen(
            [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination",
             str(store / "artifacts")], cwd=self.base, env=self.env, start_new_session=True,
            stdout=open(store / "server.log", "w"), stderr=subprocess.STDOUT)
        self.wait_for(self._mlflow_healthy, "mlflow server /health", 90)

    def _mlflow_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.tracking_uri + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def node_ids(self, resource: str, alive: bool | None = None) -> list[str]:
        """Ids of the nodes (alive, dead or both) that hold `resource`, from Ray's state API."""
        from ray.util.state import list_nodes

        nodes = list_nodes(address=self.dashboard, detail=True, limit=1000, raise_on_missing_output=False)
        return [n.node_id for n in nodes if resource in (n.resources_total or {})
                and (alive is None or (n.state == "ALIVE") == alive)]

    def actors_by_node(self) -> dict[str, list[str]]:
        """Every klrl engine actor this cluster ever ran, by class: the node ids they ran on."""
        from ray.util.state import list_actors

        out: dict[str, list[str]] = {}
        for a in list_actors(address=self.dashboard, detail=True, limit=10000, raise_on_missing_output=False):
            if a.class_name in ("LearnerWorker", "RolloutWorker"):
                out.setdefault(a.class_name, []).append(a.node_id)
        return out

    def raylet_pid(self, temp_dir: Path) -> int:
        pids = [pid for pid in processes_under(str(temp_dir))
                if Path(_argv0(pid)).name == "raylet"]
        assert len(pids) == 1, f"raylets under {temp_dir}: {pids}"
        return pids[0]

    @staticmethod
    def wait_for(ready, what: str, timeout_s: float, every_s: float = 0.5):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = ready()
            if found:
                return found
            time.sleep(every_s)
        pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def stop(self) -> None:
        kill_head(str(self.temp_b))
        kill_head(str(self.temp_a))
        if self.mlflow is not None and self.mlflow.poll() is None:
            os.killpg(self.mlflow.pid, signal.SIGTERM)  # its own session: the server and its uvicorn worker
            try:
                self.mlflow.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.mlflow.pid, signal.SIGKILL)
                self.mlflow.wait(timeout=5)


def _argv0(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def timeline() -> Timeline:
    found = Timeline()
    yield found
    found.save(Path(os.environ["KLRL_RUN_DIR"]) / "e2e" / "two_nodes_timeline.json")


@pytest.fixture(scope="module")
def nodes_tmpdir():
    with short_tmpdir("klrl-two-nodes-") as folder:
        yield folder


@pytest.fixture(scope="module")
def cluster(timeline, nodes_tmpdir) -> TwoNodes:
    base = Path(os.environ["KLRL_RUN_DIR"]) / "e2e" / uuid.uuid4().hex[:8]
    base.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "TMPDIR": str(nodes_tmpdir),  # e2e_helpers.short_tmpdir
           # The head notices a dead node in ~3 s instead of ~30 s (read by the GCS at start).
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3"}
    env.pop("RAY_ADDRESS", None)
    nodes = TwoNodes(base, env, timeline)
    try:
        nodes.start_head()
        timeline("head started", node_id=nodes.node_ids("node_a", alive=True)[0][:12], gcs=nodes.address)
        nodes.start_node_b()
        nodes.start_mlflow()
        timeline("mlflow server up", uri=nodes.tracking_uri)
        yield nodes
    finally:
        nodes.stop()
        timeline("cluster and mlflow server stopped")
        leftovers = processes_under(str(nodes.temp_a)) + processes_under(str(nodes.temp_b))
        if not os.environ.get("KLRL_KEEP_TWO_NODES"):  # set it to keep the logs, Ray's included, for a post-mortem
            shutil.rmtree(base, ignore_errors=True)
    assert not leftovers, f"processes of the test's cluster still running: {leftovers}"


def _klrl_env(cluster: TwoNodes) -> dict:
    return {k: v for k, v in cluster.env.items() if not k.startswith("RAY_health_check")}


def test_guard_refuses_node_local_stores_before_any_trial(cluster, timeline):
    run_dir = cluster.base / "guard"
    cases = [([], "--tracking-uri sqlite:"),  # the default sqlite store (and the default storage path)
             (["--tracking-uri", cluster.tracking_uri], "--storage-path ")]  # a server, but node-local storage
    for extra, named in cases:
        args = ["run", SMOKE, "--address", cluster.address, "--run-dir", str(run_dir), *PIN,
                "--set", "tracking.experiment=guard", *extra]
        done = subprocess.run([KLRL, *args], cwd=ROOT, env=_klrl_env(cluster), capture_output=True, text=True,
                              timeout=120)
        errors = [line for line in done.stderr.splitlines() if "this Ray cluster has 2 nodes" in line]
        assert done.returncode != 0 and len(errors) == 1 and named in errors[0], done.stderr[-3000:]
        assert "--tracking-uri" not in errors[0] or not extra  # the server passes; only the storage is named
        timeline("guard refused", args=" ".join(extra) or "(defaults)", error=errors[0][:160])
    import mlflow

    client = mlflow.MlflowClient(cluster.tracking_uri)
    assert client.get_experiment_by_name("guard") is None  # refused before any MLflow run was opened
    assert not (run_dir / "tune").exists()


def _collective_available() -> str | None:
    """Why rollout.weight_sync=collective cannot run in this build, or None if it can."""
    from core.config import Config, ConfigError
    from workers.actors import weight_sync

    try:
        weight_sync(Config.from_dict({"rollout": {"weight_sync": "collective"}}))
    except (ConfigError, ValueError) as exc:
        return f"rollout.weight_sync=collective is not available in this build: {exc}"
    return None


@pytest.mark.parametrize("mode", ["object_store", "collective"])
def test_study_across_two_nodes(cluster, timeline, mode):
    if mode == "collective" and (why := _collective_available()):
        pytest.skip(why)
    import mlflow

    fault = mode == "object_store"  # the fault is injected once; the collective case checks placement and sync
    run_dir, storage = cluster.base / f"study_{mode}", cluster.base / f"storage_{mode}"
    experiment = f"two_nodes_{mode}"
    args = ["run", SMOKE, "--address", cluster.address, "--run-dir", str(run_dir), "--tracking-uri",
            cluster.tracking_uri, "--storage-path", str(storage), "--shared-storage", *PIN,
            "--set", f"rollout.weight_sync={mode}", "--set", f"tracking.experiment={experiment}",
            "--set", f"run.steps={STEPS}", "--set", f"run.checkpoint_every={CHECKPOINT_EVERY}",
            "--set", "run.eval_every=8"]
    log = open(cluster.base / f"study_{mode}.log", "w")
    study = subprocess.Popen([KLRL, *args], cwd=ROOT, env=_klrl_env(cluster), stdout=log, stderr=subprocess.STDOUT)
    timeline("study started", mode=mode)
    client = mlflow.MlflowClient(cluster.tracking_uri)
    try:
        if fault:
            _kill_node_b_mid_trial(cluster, timeline, client, experiment, study, cluster.base / f"study_{mode}.log")
        study.wait(timeout=STUDY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        study.kill()
        pytest.fail(f"study did not finish in {STUDY_TIMEOUT_S} s; log tail:\n"
                    f"{(cluster.base / f'study_{mode}.log').read_text()[-4000:]}")
    finally:
        if study.poll() is None:
            study.kill()
            study.wait()
        log.close()
    output = (cluster.base / f"study_{mode}.log").read_text()
    timeline("study finished", mode=mode, exit_code=study.returncode)
    assert study.returncode == 0 and "klrl: 2/2 trial(s) finished" in output, output[-4000:]

    # Placement: every learner ran on node_a, every rollout engine on a node_b (the restarted one too).
    placed = cluster.actors_by_node()
    node_a, node_b = set(cluster.node_ids("node_a")), set(cluster.node_ids("node_b"))
    assert placed["LearnerWorker"] and set(placed["LearnerWorker"]) <= node_a
    assert placed["RolloutWorker"] and set(placed["RolloutWorker"]) <= node_b and not node_a & node_b
    timeline("placement", mode=mode, **{k: sorted(n[:12] for n in set(v)) for k, v in placed.items()})

    # MLflow server: both trial runs finished, each RL step logged exactly once, and the weights that crossed
    # nodes are the ones vLLM sampled with (its log-probs match the learner's after every sync).
    found = client.get_experiment_by_name(experiment)
    runs = [r for r in client.search_runs([found.experiment_id]) if r.data.tags.get("klrl.role") == "trial"]
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "reward/mean")]
        assert sorted(steps) == list(range(1, STEPS + 1)), (run.info.run_name, steps)
        gaps = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "rollout/logprob_gap")}
        assert max(gaps.values()) < 1e-4, (run.info.run_name, gaps)
    # Tune's trial folders, with klrl's checkpoints, are in the storage path both nodes see.
    checkpoints = sorted(storage.glob("smoke/trial_*/checkpoints/step_*/state.json"))
    assert len({c.parents[2] for c in checkpoints}) == 2, checkpoints
    assert {c.parent.name for c in checkpoints} == {f"step_{STEPS:06d}", f"step_{STEPS - CHECKPOINT_EVERY:06d}"}
    if fault:  # the hit trial failed on its dead engine and ran again with a new one on the restarted node_b
        died = re.search(r"ray\.exceptions\.Actor(Died|Unavailable)Error", output)  # which one: a race in Ray
        assert died and len(set(placed["RolloutWorker"])) == 2, output[-4000:]
    timeline("checked", mode=mode, runs=len(runs), checkpoints=len(checkpoints))


def _kill_node_b_mid_trial(cluster: TwoNodes, timeline: Timeline, client, experiment: str, study,
                           log: Path) -> None:
    """Once a trial's first checkpoint is complete (its steps reached MLflow), SIGKILL node_b's raylet; when
    the head has marked the node dead, start node_b again. Records the trial that was hit."""
    def checkpointed_run():
        found = client.get_experiment_by_name(experiment)
        assert study.poll() is None, f"study ended before the fault:\n{log.read_text()[-4000:]}"
        if found is None:
            return None
        for run in client.search_runs([found.experiment_id]):
            if run.data.metrics.get(LOGGED_STEP, 0) >= CHECKPOINT_EVERY and run.data.tags.get("klrl.role") == "trial":
                return run
        return None

    run = cluster.wait_for(checkpointed_run, "a trial's first checkpoint", STUDY_TIMEOUT_S, every_s=0.1)
    old_node = cluster.node_ids("node_b", alive=True)[0]
    pid = cluster.raylet_pid(cluster.temp_b)
    os.kill(pid, signal.SIGKILL)
    timeline("node_b raylet killed", raylet_pid=pid, trial=run.info.run_name,
             logged_step=run.data.metrics.get(LOGGED_STEP))
    cluster.wait_for(lambda: old_node in cluster.node_ids("node_b", alive=False), "the head to mark node_b dead", 60)
    timeline("head marked node_b dead", node_id=old_node[:12])
    cluster.wait_for(lambda: "Trial task failed" in log.read_text(), "Tune to fail the trial", 60)
    timeline("Tune failed the trial", trial=run.info.run_name)
    kill_head(str(cluster.temp_b))  # the dead node's remaining processes (agents, workers) before it restarts
    cluster.start_node_b()
    status = client.get_run(run.info.run_id).data.metrics.get(LOGGED_STEP)
    timeline("trial waiting to resume", trial=run.info.run_name, logged_step=status)
