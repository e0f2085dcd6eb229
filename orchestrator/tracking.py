"""MLflow behind a small adapter (imported lazily), and a null twin that records calls for unit tests.

Layout in MLflow: one experiment per study, one parent run for the study, one nested child run per
trial (tag `mlflow.parentRunId`). Everything goes through `MlflowClient` with explicit run ids rather
than the fluent API's global "active run", because the driver and many trial processes write to the same
store at once. The default store is `sqlite:///<run_dir>/mlflow.db` with artifacts in
`<run_dir>/mlartifacts`.

What the MLflow UI (3.17) shows first: the experiment page picks its tab from the *workflow type*, read
from the URL's `workflowType` query parameter, else from the browser's localStorage, else "genai", which
opens on an empty Traces page and labels every run an "Evaluation" (see the UI bundle's
`mlflow.workflowType` context and its experiment-kind hook). The `mlflow.experimentKind` experiment tag
decides it only in UIs without the workflow switch (MLflow 3.0-3.16); klrl sets it too. `ui_url` is the
link that opens the runs table directly: machine-learning workflow, the trial runs filtered in and sorted
by name (any order but by date lists them flat instead of folded under the study's collapsed parent run,
which the filter also keeps out of the charts).
The UI's telemetry notice lives only on its home page and can only be dismissed in the browser; the link
skips that page.
"""
from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
STUDY_TAG, TRIAL_TAG = "klrl.study", "klrl.trial_id"
ROLE_TAG = "klrl.role"  # 'study' on the parent run, 'trial' on children (orchestrator/report.py reads it)
STALE_TAG, STALE_REASON_TAG = "klrl.stale", "klrl.stale_reason"  # left open by a dead driver (orchestrator/stale.py)
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
GIT_COMMIT_ENV = "KLRL_GIT_COMMIT"  # set by `klrl submit`: a job's uploaded working dir has no .git
TERMINAL = ("FINISHED", "FAILED", "KILLED")
_MAX_BATCH = 100  # MLflow's log_batch limit for params
_MAX_METRICS = 1000  # MLflow's log_batch limit for metrics


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says which URI and why."""


def default_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


# What klrl can track to: MLflow's sqlite store, and an `mlflow server` (which may front any database or
# bucket). MLflow 3 refuses its file store (plain paths, file://) unless MLFLOW_ALLOW_FILE_STORE is set, and
# its other database schemes need drivers klrl does not install.
SUPPORTED_SCHEMES = ("sqlite", "http", "https")


def unsupported_uri(uri: str) -> str | None:
    """Why `uri` cannot be klrl's tracking URI (one line naming the supported schemes), or None if it can."""
    scheme = uri.partition("://")[0].lower() if "://" in uri else ""
    if scheme in SUPPORTED_SCHEMES:
        return None
    what = f"unsupported scheme {scheme + '://'!r}" if scheme else "a plain path (MLflow's file store)"
    return (f"{uri!r} is {what}; klrl tracks to sqlite:///<path>/mlflow.db (the default: a file in the run dir) "
            "or http(s)://<host>:<port> (an `mlflow server`, which can front any database)")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (seconds, not MLflow's minutes of retries) when the store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri} answered /health with {response.status}")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); start it or pass "
                                f"another --tracking-uri") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"MLflow store {uri}: cannot create {folder}: {exc.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: {folder} is not writable")


def ui_url(base: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's trial runs (see the module docstring)."""
    query = urllib.parse.urlencode({"workflowType": "machine_learning", "searchFilter": f"tags.`{ROLE_TAG}` = 'trial'",
                                    "orderByKey": f"tags.`{RUN_NAME_TAG}`", "orderByAsc": "true"},
                                   quote_via=urllib.parse.quote)
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def git_commit(cwd: str | Path | None = None) -> str:
    """$KLRL_GIT_COMMIT when set (by `klrl submit` on the submitting side), else `git rev-parse HEAD`."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _chunks(items: list, size: int = _MAX_BATCH) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class MlflowTracker:
    """The real thing: every call names its run id explicitly."""

    def __init__(self, uri: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri=uri)

    def ensure_experiment(self, name: str, artifact_dir: str | Path | None = None) -> str:
        """The experiment's id, created if missing (by the driver, before trials race to create it)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
                self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
            return found.experiment_id
        location = Path(artifact_dir).resolve().as_uri() if artifact_dir and self.uri.startswith("sqlite") else None
        return self.client.create_experiment(name, artifact_location=location,
                                             tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})

    def start_run(self, experiment_id: str, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        tags = {**tags, RUN_NAME_TAG: name, **({PARENT_TAG: parent_id} if parent_id else {})}
        return self.client.create_run(experiment_id, tags=tags, run_name=name).info.run_id

    def find_run(self, experiment_id: str, tags: dict[str, str]) -> str | None:
        """The newest run carrying all `tags`, or None (used to reopen a run on resume)."""
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([experiment_id], filter_string=query, max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def reopen(self, run_id: str) -> None:
        """RUNNING again (a resumed or retried trial, a resumed study); no longer stale if it was."""
        self.client.update_run(run_id, status="RUNNING")
        if STALE_TAG in self.run_tags(run_id):
            self.client.delete_tag(run_id, STALE_TAG)

    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.tags)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for chunk in _chunks(items):
            self.client.log_batch(run_id, params=chunk)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """One step's metrics in one log_batch, which the store writes in one transaction (all or none)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), now, step) for k, v in metrics.items() if _is_number(v)]
        if len(items) > _MAX_METRICS:
            raise ValueError(f"{len(items)} metrics at step {step}: more than one log_batch ({_MAX_METRICS}) holds")
        self.client.log_batch(run_id, metrics=items)

    def latest_metric(self, run_id: str, key: str) -> float | None:
        """The value of `key` at its highest logged step, or None if never logged."""
        return self.client.get_run(run_id).data.metrics.get(_metric_key(key))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_table(self, run_id: str, rows: list[dict], artifact_file: str) -> None:
        """A table artifact (MLflow's JSON table format, shown in the UI's artifact and evaluation views)."""
        columns = list(rows[0]) if rows else []
        self.client.log_table(run_id, data={c: [r[c] for r in rows] for c in columns}, artifact_file=artifact_file)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def children(self, experiment_id: str, parent_id: str) -> list[tuple[str, str]]:
        """(run id, status) of every child run of parent_id."""
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                       max_results=10000)
        return [(r.info.run_id, r.info.status) for r in runs]

    def end_open_children(self, experiment_id: str, parent_id: str, status: str) -> int:
        """Mark children still RUNNING/SCHEDULED as `status` (a killed trial can't end its own run)."""
        open_ids = [rid for rid, st in self.children(experiment_id, parent_id) if st not in TERMINAL]
        for rid in open_ids:
            self.end_run(rid, status)
        return len(open_ids)


class NullTracker:
    """Same interface, no MLflow: records every call in `self.calls` and keeps runs in memory."""

    def __init__(self, uri: str = "null://"):
        self.uri = uri
        self.calls: list[tuple[str, tuple]] = []
        self.runs: dict[str, dict] = {}

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def ensure_experiment(self, name: str, artifact_dir: str | Path | None = None) -> str:
        self._record("ensure_experiment", name)
        return "0"

    def start_run(self, experiment_id: str, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        run_id = f"run{len(self.runs)}"
        self.runs[run_id] = {"name": name, "tags": {**tags, **({PARENT_TAG: parent_id} if parent_id else {})},
                             "params": {}, "metrics": {}, "artifacts": {}, "status": "RUNNING"}
        self._record("start_run", run_id, name)
        return run_id

    def find_run(self, experiment_id: str, tags: dict[str, str]) -> str | None:
        hits = [rid for rid, r in self.runs.items() if all(r["tags"].get(k) == v for k, v in tags.items())]
        return hits[-1] if hits else None

    def reopen(self, run_id: str) -> None:
        self.runs[run_id]["status"] = "RUNNING"

    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self.runs[run_id]["tags"])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.runs[run_id]["tags"].update({k: str(v) for k, v in tags.items()})

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        self.runs[run_id]["params"].update({k: str(v) for k, v in params.items()})

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            if _is_number(value):
                self.runs[run_id]["metrics"].setdefault(_metric_key(key), []).append((step, float(value)))

    def latest_metric(self, run_id: str, key: str) -> float | None:
        points = self.runs[run_id]["metrics"].get(_metric_key(key))
        return max(points)[1] if points else None

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.runs[run_id]["artifacts"][artifact_file] = text

    def log_table(self, run_id: str, rows: list[dict], artifact_file: str) -> None:
        self.runs[run_id]["artifacts"][artifact_file] = json.dumps(rows)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.runs[run_id]["status"] = status

    def status(self, run_id: str) -> str:
        return self.runs[run_id]["status"]

    def children(self, experiment_id: str, parent_id: str) -> list[tuple[str, str]]:
        return [(rid, r["status"]) for rid, r in self.runs.items() if r["tags"].get(PARENT_TAG) == parent_id]

    def end_open_children(self, experiment_id: str, parent_id: str, status: str) -> int:
        open_ids = [rid for rid, st in self.children(experiment_id, parent_id) if st not in TERMINAL]
        for rid in open_ids:
            self.end_run(rid, status)
        return len(open_ids)


def make_tracker(uri: str):
    """MlflowTracker for a real URI, NullTracker for 'null://' (unit tests, dry runs)."""
    return NullTracker(uri) if uri.startswith("null://") else MlflowTracker(uri)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, (str, bool))


def _metric_key(key: str) -> str:
    # MLflow allows [A-Za-z0-9_\-. /]; '@' (pass@k) is not, so it becomes '_at_'.
    return key.replace("@", "_at_")
