"""DeepScaleR task: data loading errors, boxed extraction, math-verify equivalence, bounded time, threads."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from core.config import TaskConfig
from tasks import make_task
from tasks.base import Example
from tasks.deepscaler import last_boxed, load_rows
from tasks.math_verifier import MAX_ANSWER_CHARS, MathVerifier

FIXTURE = Path(__file__).resolve().parents[2] / "tasks" / "data" / "math_fixture.jsonl"


@pytest.fixture(scope="module")
def task():
    t = make_task(TaskConfig(name="deepscaler", data_path=str(FIXTURE), train_size=20, eval_size=8))
    t.verifier.warm_up()
    yield t
    t.verifier.close()


def ex(answer: str) -> Example:
    return Example("q", answer, {})


def test_fixture_loads_with_disjoint_splits(task):
    assert len(task.eval) == 8 and len(task.train) == 20
    assert not {e.question for e in task.eval} & {e.question for e in task.train}
    assert "boxed" in task.default_instruction


@pytest.mark.parametrize("response,gold", [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}"),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}"),
    ("first \\boxed{3} then corrected: \\boxed{42}", "42"),
    ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ("\\boxed{9\\pi}", "9\\pi"),
])
def test_equivalent_forms_score_one(task, response, gold):
    assert task.reward(response, ex(gold)) == 1.0


@pytest.mark.parametrize("response,gold", [
    ("\\boxed{0.51}", "\\frac{1}{2}"),
    ("\\boxed{3\\sqrt{2}}", "2\\sqrt{3}"),
    ("\\boxed{42} and later \\boxed{41}", "42"),
    ("the answer is 42", "42"),  # no box
    ("\\boxed{42", "42"),  # unclosed box
    ("", "42"),
])
def test_wrong_or_unboxed_scores_zero(task, response, gold):
    assert task.reward(response, ex(gold)) == 0.0


def test_nested_braces_extracted_whole():
    assert last_boxed("x \\boxed{\\frac{a^{2}}{\\sqrt{b}}} y") == "\\frac{a^{2}}{\\sqrt{b}}"
    assert last_boxed("\\boxed{1} \\boxed{{2}}") == "{2}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("no box") is None


def test_format_reward_for_boxed_wrong_answer():
    t = make_task(TaskConfig(name="deepscaler", data_path=str(FIXTURE), train_size=4, eval_size=2,
                             format_reward=0.1))
    try:
        assert t.reward("\\boxed{7}", ex("8")) == pytest.approx(0.1)
        assert t.reward("7", ex("8")) == 0.0
        assert t.reward("\\boxed{8}", ex("8")) == 1.0
    finally:
        t.verifier.close()


def test_adversarial_latex_is_bounded():
    """Inputs that make sympy hang or blow up are answered (False) within the deadline, then it recovers."""
    verifier = MathVerifier(timeout_s=2.0)
    verifier.warm_up()
    try:
        for answer in ("2^{2^{2^{2^{2^{2^{20}}}}}}", "10^{10^{10^{10}}}!", "(((((((((((x" * 20,
                       "\\frac{" * 150, "x" * (MAX_ANSWER_CHARS + 1)):
            start = time.monotonic()
            assert verifier.check(answer, "42") is False
            assert time.monotonic() - start < 2.0 + 3.0  # deadline + kill/respawn slack
        assert verifier.check("\\frac{1}{2}", "0.5")  # still works afterwards (respawned if needed)
    finally:
        verifier.close()


def test_reward_from_non_main_thread(task):
    """Ray actors and Tune trainables call the reward from worker threads (signal.alarm would fail)."""
    results, errors = [], []

    def call():
        try:
            results.append(task.reward("\\boxed{\\frac{1}{2}}", ex("0.5")))
        except Exception as err:  # pragma: no cover - the failure being tested for
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors and results == [1.0, 1.0, 1.0]


def test_missing_field_names_file_and_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"problem": "p", "answer": "1", "solution": "s"}) + "\n"
                    + json.dumps({"problem": "p2", "solution": "s"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl row 2 is missing field\(s\) \['answer'\]"):
        load_rows(str(path))


def test_malformed_json_names_file_and_row(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"problem": "p", "answer": "1", "solution": "s"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl row 2 is not valid JSON"):
        load_rows(str(path))


def test_parquet_loads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "p", "answer": 1, "solution": "s"}]), path)
    assert load_rows(str(path)) == [{"problem": "p", "answer": "1", "solution": "s"}]


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "d.csv"
    bad.write_text("problem,answer\n")
    with pytest.raises(ValueError, match="allowed: .jsonl, .parquet"):
        load_rows(str(bad))


def test_hub_id_without_datasets_gives_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ValueError, match="hub dataset id.*datasets"):
        load_rows("agentica-org/DeepScaleR-Preview-Dataset")


def test_task_pickles_for_ray_actors(task):
    import pickle

    clone = pickle.loads(pickle.dumps(task))
    try:
        assert clone.reward("\\boxed{6}", ex("6")) == 1.0
    finally:
        clone.verifier.close()


def test_deadline_kills_and_respawns_the_helper():
    """Work the helper's own alarm cannot stop in time (deadline below the 1 s alarm) is cut by a kill."""
    verifier = MathVerifier(timeout_s=0.2)
    try:
        verifier.warm_up()
        start = time.monotonic()
        assert verifier.check("9^{9^{9^{9}}}", "42") is False  # sympy works on it until the 1 s alarm
        assert time.monotonic() - start < 0.2 + 5.0
        assert verifier._proc is None  # killed; the next call starts a fresh helper
        verifier.timeout_s = 30.0
        assert verifier.check("\\frac{1}{2}", "0.5")
    finally:
        verifier.close()
