"""The study logic with a stand-in evaluator and levels source (no model needed)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import optuna
import pytest

from autosparse.errors import ConfigError, StorageError
from autosparse.methods import Method
from autosparse.results import EvalResult
from autosparse.stats import PairedDiff
from autosparse.tuning import (
    StudySpec,
    Tuner,
    clamp_levels,
    create_or_resume,
    finished_trials,
    open_storage,
    screen_slices,
)

LAYERS = 6


class FakeLevels:
    """Levels fall linearly with the threshold; w_sum tilts them across layers."""

    def levels(self, w_sum, w_count, threshold, top_k):
        return [
            min(1.0, max(0.0, round(1.0 - threshold + (w_sum - 0.5) * (i - 2.5) / 10, 2)))
            for i in range(LAYERS)
        ]

    def solve(self, w_sum, w_count, top_k, goal):
        best = min(
            (
                abs(sum(clamp_levels(self.levels(w_sum, w_count, t / 100, top_k))) / LAYERS - goal),
                t / 100,
            )
            for t in range(0, 101)
        )
        return best[1], self.levels(w_sum, w_count, best[1], top_k)


class FakeEvaluator:
    """Score of a document: more kept neurons (and a w_sum near 0.3) score higher."""

    metric = "acc"

    def __init__(self, n_docs=40):
        self.n_docs = n_docs
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def document_ids(self):
        return list(range(self.n_docs))

    def prepare(self, ids):
        self.calls.append(("prepare", tuple(ids)))

    def run(self, method: Method, ids):
        self.calls.append((method.name, tuple(ids)))
        keep = method.mean_keep
        w = method.params.get("w_sum", 0.3)
        scores = [keep - (w - 0.3) ** 2 + ((i * 7919) % 13) / 100 for i in ids]
        return EvalResult(
            model="fake",
            task="fake",
            method=method.to_dict(),
            metric="acc",
            score=sum(scores) / len(scores),
            sample_ids=list(ids),
            sample_scores=scores,
            density=None if method.name == "dense" else keep * 0.9,
            seconds=0.01,
        )


def make_tuner(tmp_path, name="s", **spec_kw):
    spec_kw.setdefault("goal", 0.4)
    spec = StudySpec(model="fake", model_id="fake-id", task="fake", screen=16, **spec_kw)
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=None)
    study = create_or_resume(storage, name, spec)
    tuner = Tuner(study, spec, FakeEvaluator(), FakeLevels())
    tuner.prepare(list(range(100, 116)))
    return tuner


def test_solve_trials_all_meet_the_goal(tmp_path):
    tuner = make_tuner(tmp_path)
    tuner.run(trials=10)
    done = finished_trials(tuner.study)
    assert done
    for t in tuner.study.trials:
        assert abs(t.user_attrs["achieved_mean"] - 0.4) <= 0.01
        assert t.user_attrs["levels"] == clamp_levels(t.user_attrs["levels"])
    best = done[0]
    assert best.user_attrs["sample_ids"] == list(range(100, 116))
    assert "vs_coreinfer" in best.user_attrs
    # The stored difference carries its spread for the power figures (the fake evaluator's
    # per-document noise cancels in the pairs: every document differs by the same amount).
    stored = best.user_attrs["vs_coreinfer"]
    assert {"sd", "detectable", "needed", "level"} <= stored.keys()
    diff = PairedDiff.from_dict(stored)
    assert diff.n == 16 and diff.sd == pytest.approx(0.0, abs=1e-12)


def test_baselines_are_evaluated_once_on_the_screen(tmp_path):
    tuner = make_tuner(tmp_path)
    tuner.prepare(list(range(100, 116)))  # a second prepare re-uses what is stored
    tuner.run(trials=3)
    baseline_calls = [c for c in tuner.evaluator.calls if c[0] not in ("levels", "prepare")]
    assert [c[0] for c in baseline_calls] == ["coreinfer", "dense"]
    assert all(c[1] == tuple(range(100, 116)) for c in baseline_calls)
    assert tuner.baseline("coreinfer").density == pytest.approx(0.36)


def test_the_screen_is_prepared_before_any_evaluation(tmp_path):
    tuner = make_tuner(tmp_path)
    tuner.run(trials=2)
    calls = tuner.evaluator.calls
    assert calls[0] == ("prepare", tuple(range(100, 116)))
    assert all(c[0] != "prepare" for c in calls[1:])


def test_constrained_trials_outside_the_tolerance_are_infeasible(tmp_path):
    tuner = make_tuner(tmp_path, strategy="constrained", tolerance=0.02)
    tuner.run(trials=12)
    feasible = [t for t in tuner.study.trials if t.user_attrs["feasible"]]
    infeasible = [t for t in tuner.study.trials if not t.user_attrs["feasible"]]
    assert infeasible, "a threshold in [0, 1] should often miss a 0.4 goal"
    for t in infeasible:
        assert t.constraints["goal"] > 0
        assert abs(t.user_attrs["achieved_mean"] - 0.4) > 0.02
        assert t.state == optuna.trial.TrialState.PRUNED
    for t in feasible:
        assert t.constraints["goal"] <= 0
    evaluated = {c[1] for c in tuner.evaluator.calls if c[0] == "levels"}
    assert len(evaluated) <= 3 * len(feasible)  # no model run for infeasible settings


def test_pruning_reports_growing_slices(tmp_path):
    tuner = make_tuner(tmp_path)
    tuner.run(trials=12)
    for t in tuner.study.trials:
        steps = sorted(t.intermediate_values)
        assert steps == list(range(len(steps)))
        n = len(t.user_attrs["sample_ids"])
        assert n == screen_slices(16)[len(steps) - 1]
    assert screen_slices(16) == [4, 8, 16]
    assert screen_slices(1) == [1]


def test_same_seed_gives_the_same_study(tmp_path):
    a = make_tuner(tmp_path / "a")
    a.run(trials=6)
    b = make_tuner(tmp_path / "b")
    b.run(trials=6)
    assert [t.params for t in a.study.trials] == [t.params for t in b.study.trials]
    assert [t.value for t in a.study.trials] == [t.value for t in b.study.trials]


def test_resume_keeps_finished_trials_and_continues(tmp_path):
    first = make_tuner(tmp_path)
    first.run(trials=4)
    numbers = [(t.number, t.params) for t in first.study.trials]
    again = make_tuner(tmp_path)
    ran = again.run(trials=7)
    assert ran == 3
    assert [(t.number, t.params) for t in again.study.trials][:4] == numbers
    assert len(again.study.trials) == 7


def test_a_study_of_another_model_is_refused(tmp_path):
    make_tuner(tmp_path).run(trials=1)
    spec = StudySpec(model="other", model_id="other-id", task="fake", goal=0.4, screen=16)
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=None)
    with pytest.raises(StorageError, match="model_id='fake-id'"):
        create_or_resume(storage, "s", spec)
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 1


@pytest.mark.parametrize("goal", [0.0, 1.5, -0.2])
def test_goal_outside_unit_interval_is_refused(goal):
    with pytest.raises(ConfigError, match="outside"):
        StudySpec(model="m", model_id="m", task="t", goal=goal)


def test_unreachable_storage_is_one_line_error(tmp_path):
    with pytest.raises(StorageError, match="cannot open storage") as err:
        open_storage("postgresql://nobody@127.0.0.1:1/none", heartbeat=None)
    assert "\n" not in str(err.value)
    with pytest.raises(StorageError, match="not a database URL"):
        open_storage("not a url", heartbeat=None)


def test_goal_from_baseline(tmp_path):
    tuner = make_tuner(tmp_path, goal=None, goal_from_baseline=0.9)
    assert tuner.goal == pytest.approx(0.9 * 0.36)
    tuner.run(trials=3)
    assert math.isclose(tuner.study.user_attrs["goal"], 0.324)
    for t in tuner.study.trials:  # the solve strategy aims every trial at it
        assert abs(t.user_attrs["achieved_mean"] - 0.324) <= 0.01


WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_tuning import make_tuner
    from pathlib import Path
    tuner = make_tuner(Path({tmp!r}))
    tuner.run(trials=16)
    """
)


def test_sqlite_studies_use_the_write_ahead_log(tmp_path):
    import sqlite3

    make_tuner(tmp_path)
    with sqlite3.connect(tmp_path / "study.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_two_processes_share_one_sqlite_study(tmp_path):
    make_tuner(tmp_path)  # create the study and its baselines first
    code = WORKER.format(tests=str(__import__("pathlib").Path(__file__).parent), tmp=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=None)
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert 16 <= len(trials) <= 17  # two workers may both start the last trial
    assert all(t.state.is_finished() for t in trials)


def test_finalize_reports_top_trials_avg_and_baselines(tmp_path):
    from autosparse.finalize import finalize, held_out_ids
    from autosparse.report import to_markdown

    tuner = make_tuner(tmp_path)
    tuner.study.set_user_attr("calibration_ids", [0, 1, 2, 3])
    tuner.run(trials=6)
    report = finalize(tuner.study, tuner.spec, tuner.evaluator, top_k=2, limit=10)
    held_out, screen = report.sections
    labels = [r.label for r in held_out.rows]
    assert labels[:2] == ["CoreInfer keep=0.4", "dense"]
    assert labels[-1] == "AVG of top 2" and len(labels) == 5
    ids = tuner.evaluator.calls[-1][1]
    assert len(ids) == 10 and not set(ids) & {0, 1, 2, 3}
    assert all(r.n == 10 for r in held_out.rows)
    assert screen.rows[2].value == finished_trials(tuner.study)[0].value
    assert "AVG of top 2" in to_markdown(report)
    assert held_out_ids(range(10), calibration=[0, 1]) == list(range(2, 10))
    with pytest.raises(ConfigError, match="exceeds"):
        held_out_ids(range(10), calibration=[0], screen=[1, 2], limit=8)


def test_a_griffin_study_selects_with_griffin_everywhere(tmp_path):
    from autosparse.finalize import candidates

    tuner = make_tuner(tmp_path, selector="griffin")
    seen, run = [], tuner.evaluator.run
    tuner.evaluator.run = lambda method, ids: seen.append(method) or run(method, ids)
    tuner.run(trials=3)
    assert {m.name for m in seen} == {"levels"}
    assert all(m.selector == "griffin" for m in seen)
    assert tuner.baseline("coreinfer").method["selector"] == "griffin"
    assert tuner.study.trials[0].user_attrs["levels"]
    for c in candidates(tuner.study, tuner.spec, top_k=2, select="mean"):
        assert c.method.selector == "griffin"


def test_a_study_refuses_to_resume_with_another_selector(tmp_path):
    make_tuner(tmp_path).run(trials=1)
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=None)
    griffin = StudySpec(
        model="fake", model_id="fake-id", task="fake", goal=0.4, screen=16, selector="griffin"
    )
    with pytest.raises(StorageError, match="selector='coreinfer', not 'griffin'") as info:
        create_or_resume(storage, "s", griffin)
    assert "\n" not in str(info.value)
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 1


def test_a_study_stored_before_selectors_resumes_as_coreinfer(tmp_path):
    from autosparse.tuning import SPEC_ATTR

    tuner = make_tuner(tmp_path)
    tuner.run(trials=1)
    old = {k: v for k, v in tuner.study.user_attrs[SPEC_ATTR].items() if k != "selector"}
    tuner.study.set_user_attr(SPEC_ATTR, old)
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=None)
    create_or_resume(storage, "s", tuner.spec)  # the default selector: accepted
    griffin = StudySpec(
        model="fake", model_id="fake-id", task="fake", goal=0.4, screen=16, selector="griffin"
    )
    with pytest.raises(StorageError, match="selector"):
        create_or_resume(storage, "s", griffin)


def test_default_study_names_keep_coreinfer_names():
    from autosparse.tuning import default_study_name

    assert default_study_name("m", "t", 0.4, None) == "m-t-g0.4"
    assert default_study_name("m", "t", 0.4, None, "griffin") == "m-t-g0.4-griffin"


def test_finalize_candidates_skip_trials_that_repeat_a_better_level_vector(tmp_path):
    from optuna.trial import create_trial

    from autosparse.finalize import candidates

    tuner = make_tuner(tmp_path)
    vectors = [[0.3, 0.5], [0.3, 0.5], [0.4, 0.4], [0.5, 0.3]]
    for number, (value, levels) in enumerate(zip([0.9, 0.9, 0.8, 0.7], vectors, strict=True)):
        tuner.study.add_trial(
            create_trial(value=value, user_attrs={"levels": levels, "params": {"n": number}})
        )
    chosen = candidates(tuner.study, tuner.spec, top_k=2, select="mean")
    assert [c.label for c in chosen] == ["trial #0", "trial #2", "AVG of top 2"]
    assert list(chosen[-1].method.keep) == [0.35, 0.45]
