"""The free search space: grid projection, the level switch, the sampler's proposals, and
a free study with a stand-in evaluator (no model needed)."""

from __future__ import annotations

import random

import optuna
import pytest
from test_tuning import FakeEvaluator, FakeLevels

from autosparse.errors import ConfigError, StorageError
from autosparse.free_space import (
    MEAN_TOLERANCE,
    MOVES_ATTR,
    PARENT_ATTR,
    KeepGrid,
    level_switch,
    param_names,
    project_to_grid,
    propose,
    starting_vectors,
)
from autosparse.methods import Method
from autosparse.results import EvalResult
from autosparse.tuning import (
    IDENTITY_FIELDS,
    StudySpec,
    Tuner,
    check_spec,
    create_or_resume,
    finished_trials,
    open_storage,
)

GRID = KeepGrid(0.025, 0.05, 1.0)


def on_grid(x: float, grid: KeepGrid = GRID) -> bool:
    k = (x - grid.low) / grid.step
    return abs(k - round(k)) < 1e-9 and grid.low - 1e-12 <= x <= grid.high + 1e-12


def steps(a, b, grid: KeepGrid = GRID) -> list[int]:
    return [grid.index(y) - grid.index(x) for x, y in zip(a, b, strict=True)]


# ------------------------------------------------------------------ projection


@pytest.mark.parametrize("seed", range(30))
def test_projection_keeps_the_mean_the_grid_and_the_bounds(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 40)
    goal = round(rng.uniform(0.1, 0.9), 3)
    levels = [rng.uniform(-0.2, 1.3) for _ in range(n)]  # some outside the bounds
    out = project_to_grid(levels, goal, GRID)
    assert len(out) == n
    assert abs(sum(out) / n - goal) <= MEAN_TOLERANCE
    assert all(on_grid(x) for x in out)


def test_projection_moves_little_from_a_vector_near_the_goal():
    levels = [0.31, 0.42, 0.47, 0.40]  # mean 0.40
    out = project_to_grid(levels, 0.4, GRID)
    assert sum(out) / 4 == pytest.approx(0.4)
    assert all(abs(a - b) <= GRID.step for a, b in zip(out, levels, strict=True))
    assert project_to_grid([0.4] * 5, 0.4, GRID) == [0.4] * 5


def test_an_unreachable_mean_is_refused():
    with pytest.raises(ConfigError, match="finer --grid"):
        project_to_grid([0.41], 0.41, GRID)  # one layer: 0.4 or 0.425
    with pytest.raises(ConfigError, match="whole number of grid steps"):
        KeepGrid(0.03, 0.05, 1.0)
    with pytest.raises(ConfigError, match="low < high"):
        KeepGrid(0.025, 0.5, 0.5)


# ------------------------------------------------------------------ level switch


@pytest.mark.parametrize("seed", range(20))
def test_level_switch_preserves_the_budget_and_the_bounds(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 30)
    parent = project_to_grid([rng.uniform(0, 1) for _ in range(n)], 0.3, GRID)
    moves = rng.randint(1, 8)
    child = level_switch(parent, GRID, moves, random.Random(seed))
    assert sum(GRID.indices(child)) == sum(GRID.indices(parent))  # exactly, in steps
    assert all(on_grid(x) for x in child)
    assert sum(abs(d) for d in steps(parent, child)) <= 2 * moves
    assert child == level_switch(parent, GRID, moves, random.Random(seed))  # seeded


def test_level_switch_at_the_bounds_moves_only_what_can_move():
    grid = KeepGrid(0.25, 0.25, 1.0)  # indices 0..3
    parent = [0.25, 0.25, 1.0]  # only the last layer can give, only the others take
    for seed in range(10):
        child = level_switch(parent, grid, 1, random.Random(seed))
        assert child[2] == 0.75 and sorted(child[:2]) == [0.25, 0.5]
    with pytest.raises(ConfigError, match="lower bound"):
        level_switch([0.25, 0.25], grid, 1, random.Random(0))


# ------------------------------------------------------------------ proposals


def test_a_proposal_is_a_child_of_the_best_finished_vector():
    uniform = [0.4] * 6
    best = [0.5, 0.3, 0.4, 0.4, 0.45, 0.35]
    worse = [0.3, 0.5, 0.4, 0.4, 0.35, 0.45]
    finished = [(uniform, 0.1), (best, 0.7), (worse, 0.2)]
    for seed in range(20):
        p = propose(finished, goal=0.4, grid=GRID, n_layers=6, max_moves=3, rng=random.Random(seed))
        assert p.parent == 1 and 1 <= p.moves <= 3
        d = steps(best, p.levels)
        assert sum(d) == 0 and 0 < sum(abs(x) for x in d) <= 2 * p.moves
        assert abs(sum(p.levels) / 6 - 0.4) <= MEAN_TOLERANCE


def test_without_finished_vectors_the_parent_is_uniform_and_seen_children_are_redrawn():
    first = propose([], goal=0.4, grid=GRID, n_layers=4, max_moves=1, rng=random.Random(3))
    assert first.parent is None and sum(abs(d) for d in steps([0.4] * 4, first.levels)) == 2
    again = propose(
        [],
        goal=0.4,
        grid=GRID,
        n_layers=4,
        max_moves=1,
        rng=random.Random(3),
        seen={tuple(first.levels)}.__contains__,
    )
    assert again.levels != first.levels


def test_starting_vectors_are_uniform_then_the_projected_formula():
    starts = starting_vectors(0.4, GRID, 4, [0.2, 0.33, 0.51, 0.56])
    assert starts[0] == [0.4] * 4
    assert sum(starts[1]) / 4 == pytest.approx(0.4) and all(on_grid(x) for x in starts[1])
    assert starting_vectors(0.4, GRID, 4, [0.4] * 4) == [[0.4] * 4]
    assert param_names([6, 7, 26]) == ["keep_06", "keep_07", "keep_26"]


# ------------------------------------------------------------------ a free study


class ShapedEvaluator(FakeEvaluator):
    """Scores a vector by its closeness to a shape whose mean is 0.4 (rising by layer)."""

    TARGET = [0.2, 0.3, 0.35, 0.45, 0.5, 0.6]

    def run(self, method: Method, ids):
        self.calls.append((method.name, tuple(ids)))
        keep = method.keep if isinstance(method.keep, tuple) else (method.mean_keep,) * 6
        loss = sum((k - t) ** 2 for k, t in zip(keep, self.TARGET, strict=True))
        scores = [-loss + ((i * 7919) % 13) / 1000 for i in ids]
        return EvalResult(
            model="fake",
            task="fake",
            method=method.to_dict(),
            metric="neg_kl",
            score=sum(scores) / len(scores),
            sample_ids=list(ids),
            sample_scores=scores,
            density=None if method.name == "dense" else method.mean_keep * 0.9,
            seconds=0.01,
        )


class LayeredLevels(FakeLevels):
    layers = (10, 11, 12, 13, 14, 15)

    def solve(self, w_sum, w_count, top_k, goal):
        # a formula that leans the right way, off the grid
        return 0.5, [0.26, 0.31, 0.38, 0.44, 0.49, 0.52]


def free_tuner(tmp_path, name="f", **spec_kw):
    spec_kw.setdefault("goal", 0.4)
    spec = StudySpec(
        model="fake", model_id="fake-id", task="fake", screen=16, space="free", **spec_kw
    )
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=None)
    levels = LayeredLevels()
    study = create_or_resume(storage, name, spec, layers=levels.layers)
    tuner = Tuner(study, spec, ShapedEvaluator(), levels)
    tuner.prepare(list(range(100, 116)))
    return tuner


def vector(t) -> list[float]:
    return [t.params[n] for n in param_names(LayeredLevels.layers)]


def test_free_study_starts_uniform_and_formula_and_keeps_the_mean(tmp_path):
    tuner = free_tuner(tmp_path)
    assert tuner.spec.objective == "kl"  # the free space's default
    tuner.run(trials=12)
    trials = tuner.study.trials
    assert len(trials) == 12
    assert vector(trials[0]) == [0.4] * 6 and trials[0].user_attrs["start"] == "uniform"
    _, formula = LayeredLevels().solve(0.5, 0.5, 100, 0.4)
    assert vector(trials[1]) == project_to_grid(formula, 0.4, GRID) != [0.4] * 6
    assert trials[1].user_attrs["start"] == "formula"
    for t in trials:
        levels = t.user_attrs["levels"]
        assert levels == vector(t) and t.user_attrs["params"] == t.params
        assert abs(sum(levels) / 6 - 0.4) <= MEAN_TOLERANCE
        assert all(on_grid(x) for x in levels)
        assert t.user_attrs["density"] is not None
    # every later trial is a child of the best trial finished before it
    for t in trials[2:]:
        parent = t.system_attrs[PARENT_ATTR]
        earlier = [u for u in trials[: t.number] if u.state.name == "COMPLETE"]
        assert parent == max(earlier, key=lambda u: u.value).number
        d = steps(vector(trials[parent]), vector(t))
        assert sum(d) == 0 and 0 < sum(abs(x) for x in d) <= 2 * t.system_attrs[MOVES_ATTR]
    # the search finds a better vector than the uniform one for a shaped fitness
    assert finished_trials(tuner.study)[0].value > trials[0].value


def test_free_study_prunes_on_growing_screens(tmp_path):
    tuner = free_tuner(tmp_path)
    tuner.run(trials=14)
    sizes = {len(t.user_attrs["sample_ids"]) for t in tuner.study.trials}
    assert 16 in sizes
    for t in tuner.study.trials:
        assert sorted(t.intermediate_values) == list(range(len(t.intermediate_values)))


def test_free_sampler_state_comes_from_the_storage(tmp_path):
    """A resumed study proposes what one uninterrupted run proposes."""
    straight = free_tuner(tmp_path / "a")
    straight.run(trials=9)
    first = free_tuner(tmp_path / "b")
    first.run(trials=5)
    resumed = free_tuner(tmp_path / "b")  # a new process: new sampler, same storage
    assert resumed.run(trials=9) == 4
    assert [t.params for t in resumed.study.trials] == [t.params for t in straight.study.trials]


def test_a_study_of_one_space_refuses_the_other(tmp_path):
    free_tuner(tmp_path).run(trials=2)
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=None)
    formula = StudySpec(model="fake", model_id="fake-id", task="fake", goal=0.4, screen=16)
    with pytest.raises(StorageError, match="space='free', not 'formula'") as err:
        create_or_resume(storage, "f", formula)
    assert "\n" not in str(err.value)
    with pytest.raises(StorageError, match="grid=0.025, not 0.05"):
        create_or_resume(
            storage,
            "f",
            StudySpec(
                model="fake",
                model_id="fake-id",
                task="fake",
                goal=0.4,
                screen=16,
                space="free",
                grid=0.05,
            ),
        )


def test_a_stored_spec_without_a_space_reads_as_formula(tmp_path):
    spec = StudySpec(model="fake", model_id="fake-id", task="fake", goal=0.4, screen=16)
    old = {k: v for k, v in spec.to_dict().items() if k not in ("space", "grid", "keep_range")}
    old.pop("max_moves")
    assert StudySpec.from_dict(old).space == "formula"
    assert StudySpec.from_dict(old).identity() == spec.identity()
    assert set(spec.identity()) == set(IDENTITY_FIELDS)  # the free fields stay out of it
    storage = open_storage(f"sqlite:///{tmp_path / 'old.db'}", heartbeat=None)
    study = optuna.create_study(study_name="old", storage=storage)
    study.set_user_attr("autosparse:spec", old)
    check_spec(study, spec)  # no error: an old study resumes as the formula space
    with pytest.raises(StorageError, match="space='formula', not 'free'"):
        check_spec(
            study, StudySpec(**{**spec.to_dict(), "keep_range": (0.05, 1.0), "space": "free"})
        )


def test_free_finalize_averages_vectors_and_reports_the_gap(tmp_path):
    from autosparse.finalize import GAP_KEY, finalize
    from autosparse.report import gap_line, to_json, to_markdown

    tuner = free_tuner(tmp_path)
    tuner.run(trials=6)
    report = finalize(
        tuner.study,
        tuner.spec,
        ShapedEvaluator(n_docs=60),
        top_k=2,
        limit=10,
        objective_evaluator=ShapedEvaluator(n_docs=60),
    )
    best = finished_trials(tuner.study)[0]
    held_out = report.sections[0]
    assert held_out.rows[-1].label == "AVG of top 2"
    assert held_out.rows[2].params == best.params
    meta = report.meta
    assert meta["winner"].startswith(f"trial #{best.number} ")
    assert meta["winner on the screen"] == pytest.approx(best.value, rel=1e-5)
    assert meta[GAP_KEY] == pytest.approx(
        meta["winner held out"] - meta["winner on the screen"], abs=1e-5
    )
    assert meta["winner held out"] == pytest.approx(held_out.rows[2].value, rel=1e-5)
    assert meta["winner gain over CoreInfer on the screen"] == pytest.approx(
        best.user_attrs["vs_coreinfer"]["mean"], rel=1e-5
    )
    assert meta["winner gain over CoreInfer held out"] == pytest.approx(
        held_out.rows[2].value - held_out.rows[0].value, abs=1e-5
    )
    assert meta["winner gain baseline"].startswith("CoreInfer keep=")
    assert f"gain over {meta['winner gain baseline']}: screen +" in gap_line(meta)
    assert to_json(report)["meta"][GAP_KEY] == meta[GAP_KEY]
    assert GAP_KEY in to_markdown(report) and "levels 10-15: " in to_markdown(report)
    assert "screen-to-held-out gap" in gap_line(meta)


def test_gap_line_names_the_studys_baseline():
    from autosparse.finalize import GAP_KEY
    from autosparse.report import gap_line

    meta = {
        GAP_KEY: 0.05,
        "winner": "trial #3 (objective kl)",
        "winner on the screen": -0.31,
        "winner held out": -0.26,
        "winner gain over CoreInfer on the screen": 0.034,
        "winner gain over CoreInfer held out": 0.019,
    }
    # reports written before the baseline was named: CoreInfer's
    assert "gain over CoreInfer: screen +0.034, held out +0.019" in gap_line(meta)
    griffin = gap_line({**meta, "winner gain baseline": "GRIFFIN keep=0.4"})
    assert "gain over GRIFFIN keep=0.4: screen +0.034" in griffin


def test_formula_finalize_reports_the_gap_in_the_task_metric(tmp_path):
    from test_tuning import make_tuner

    from autosparse.finalize import GAP_KEY, finalize

    tuner = make_tuner(tmp_path)
    tuner.run(trials=4)
    report = finalize(tuner.study, tuner.spec, tuner.evaluator, top_k=1, limit=10)
    best = finished_trials(tuner.study)[0]
    assert report.meta["winner"] == f"trial #{best.number} (task metric)"
    assert report.meta[GAP_KEY] == pytest.approx(
        report.sections[0].rows[2].value - best.value, abs=1e-5
    )


FREE_WORKER = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_free_space import free_tuner
free_tuner(Path({tmp!r})).run(trials=10)
"""


def test_two_processes_share_one_free_study(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    free_tuner(tmp_path)  # create the study, its baselines and starting trials first
    code = FREE_WORKER.format(tests=str(Path(__file__).parent), tmp=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=None)
    trials = optuna.load_study(study_name="f", storage=storage).trials
    assert 10 <= len(trials) <= 11 and all(t.state.is_finished() for t in trials)
    assert [t.user_attrs.get("start") for t in trials[:2]] == ["uniform", "formula"]
    for t in trials:
        assert abs(sum(vector(t)) / 6 - 0.4) <= MEAN_TOLERANCE
