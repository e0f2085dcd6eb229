"""The positive control through the CLI: a KL arm 10x the miniature coefficient must come out closer to π_ref.

A shortened `search_spaces/positive_control.yaml` (fewer seeds, the same per-trial settings) runs through
`klrl run` exactly as typed, which ends by writing the report; the report must find the KL arm's exact
reverse KL lower than the no-KL arm's, paired by seed, with Holm-adjusted paired-t p < 0.05. If this
fails, the instrument (trial loop, tracking, report or statistics) cannot see an effect it was built to see.
The control reads only `kl/exact_reverse`, a key every version of the trial loop logs.
"""
from __future__ import annotations

import csv

import yaml

from e2e_helpers import ROOT, klrl

CONTROL = "search_spaces/positive_control.yaml"
# 3 seeds: the paired t-test needs |t| > 4.30, i.e. |d_z| > 2.5; the pilot saw d_z ~ -11 (see the study file)
SEEDS = [0, 1, 2]


def test_positive_control_is_detected_as_closer_to_pi_ref(short_run_dir):
    study = yaml.safe_load((ROOT / CONTROL).read_text())
    assert len(study["grid"]["run.seed"]) >= len(SEEDS)  # the shipped study has more seeds than this shortcut
    study["grid"]["run.seed"] = SEEDS
    space = short_run_dir / "positive_control_short.yaml"
    space.write_text(yaml.safe_dump(study, sort_keys=False))
    done = klrl("run", str(space), "--run-dir", str(short_run_dir / "run"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = short_run_dir / "run" / "report"
    rows = [r for r in csv.DictReader((report / "comparisons.csv").open()) if r["key"] == "kl/exact_reverse"]
    assert [(r["arm"].split()[0], r["ref"]) for r in rows] == [("in_reward/k1", "none")], rows
    (control,) = rows
    assert int(control["pairs"]) == len(SEEDS)
    assert float(control["mean_diff"]) < 0 and float(control["ci_hi"]) < 0, control  # closer to π_ref
    assert float(control["p_t_holm"]) < 0.05 and control["significant"] == "True", control
    text = (report / "report.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("| exact KL reverse") and "− none" in x)
    assert f"**{control['arm']} lower than none**" in line
    print(f"positive control: exact KL reverse {control['arm']} - none = {float(control['mean_diff']):.3f} "
          f"[{float(control['ci_lo']):.3f}, {float(control['ci_hi']):.3f}], d_z {float(control['d_z']):.2f}, "
          f"paired t p = {float(control['p_t_holm']):.2g}")
