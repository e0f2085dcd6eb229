"""The CLI around a study: --version and help texts, which study `klrl ui` opens, the Ray-job guard, and the
command `klrl submit` sends."""
from __future__ import annotations

import argparse
import json

import pytest

from orchestrator import cli, submit
from orchestrator.tracking import GIT_COMMIT_ENV, git_commit, ui_url


def make_studies(root, *names):
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "study.yaml").write_text(f"name: {name}\n")


def test_version_and_helps_say_what_they_do(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("klrl ")
    monkeypatch.delenv("KLRL_RUN_DIR", raising=False)
    for command in ("run", "submit", "report", "ui"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for option in ("--tracking-uri", "--out", "--include-unfinished", "--port", "--run-dir"):
            if option in text:  # every option of the command has a help text after its metavar
                assert text.split(option, 1)[1].split("--", 1)[0].strip().split(" ", 1)[-1], (command, option)
        if "--run-dir RUN_DIR" in text:
            assert "./runs/<study>" in text  # the real default when KLRL_RUN_DIR is unset
    monkeypatch.setenv("KLRL_RUN_DIR", "/data/klrl")
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    assert "/data/klrl/<study>" in " ".join(capsys.readouterr().out.split())


def test_ui_without_a_study_opens_the_only_or_the_default_one_else_lists_them(tmp_path, monkeypatch):
    monkeypatch.setenv("KLRL_RUN_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="no study under"):
        cli._default_study()
    make_studies(tmp_path, "smoke")
    assert cli._default_study() == str(tmp_path / "smoke")
    make_studies(tmp_path, "optuna_smoke")
    with pytest.raises(ValueError, match="klrl ui optuna_smoke, klrl ui smoke"):
        cli._default_study()
    make_studies(tmp_path, "miniature")
    assert cli._default_study() == str(tmp_path / "miniature")


def test_a_ray_job_refuses_a_run_dir_inside_its_working_dir_copy(tmp_path, monkeypatch, capsys):
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv(GIT_COMMIT_ENV, raising=False)
    monkeypatch.delenv("KLRL_RUN_DIR", raising=False)  # the default run dir is then ./runs/<study>: in the copy
    assert submit.usable_in_job(copy / "runs" / "smoke", "smoke")  # not a job: no guard
    monkeypatch.setenv(submit.JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}))
    assert not submit.usable_in_job(cli.default_run_dir("smoke", None), "smoke")
    said = capsys.readouterr().err
    assert f"inside Ray's temporary copy of the job's working dir ({copy})" in said and "--run-dir /" in said
    assert submit.usable_in_job(tmp_path / "kept" / "smoke", "smoke")
    assert "git_commit=unknown" in capsys.readouterr().err and git_commit() == "unknown"
    monkeypatch.setenv(GIT_COMMIT_ENV, "0123abcd")
    assert git_commit() == "0123abcd"


def test_submit_sends_klrl_run_with_the_absolute_run_dir_and_every_option(tmp_path):
    args = argparse.Namespace(set=["run.steps=2", "task.name=palindrome"], tracking_uri="http://h:5000",
                              storage_path=None, resume=True)
    command = submit.entrypoint("search_spaces/smoke.yaml", tmp_path / "my runs" / "smoke", args,
                                {GIT_COMMIT_ENV: "0123abcd"})
    assert command == (f"env KLRL_GIT_COMMIT=0123abcd klrl run search_spaces/smoke.yaml --run-dir "
                       f"'{tmp_path}/my runs/smoke' --set run.steps=2 --set task.name=palindrome "
                       "--tracking-uri http://h:5000 --resume")


def test_ui_link_opens_the_trial_runs_in_the_machine_learning_view():
    url = ui_url("http://127.0.0.1:5000/", "7")
    assert url.startswith("http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning&")
    assert "searchFilter=tags.%60klrl.role%60%20%3D%20%27trial%27" in url
