"""Report rows, rich tables, Markdown and JSON, on numbers from the seed's tables."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from autosparse.errors import ConfigError
from autosparse.methods import Method
from autosparse.report import (
    DENSITY_HEADER,
    KEPT_HEADER,
    Report,
    ReportRow,
    ReportSection,
    StudySummary,
    TrialRow,
    from_json,
    levels_table,
    make_row,
    percent_of,
    rows_table,
    study_tables,
    to_json,
    to_markdown,
    trial_line,
    write_report,
)
from autosparse.results import EvalResult
from autosparse.stats import PairedDiff, SampleMismatchError

IDS = list(range(8))


def _res(method: Method, score: float, scores: list[float], density=None, ids=IDS) -> EvalResult:
    return EvalResult(
        model="llama3-3b",
        task="truthfulqa",
        method=method.to_dict(),
        metric="bleu_max",
        score=score,
        sample_ids=list(ids),
        sample_scores=scores,
        density=density,
    )


@pytest.fixture
def results():
    core = _res(Method.coreinfer(0.4), 6.33, [6.0, 7.0, 5.0, 6.5, 6.0, 7.0, 6.2, 6.9], 0.4)
    dense = _res(Method.dense(), 8.0, [8.0, 8.5, 7.0, 8.0, 7.5, 9.0, 8.0, 8.0])
    best = _res(
        Method.levels([0.3, 0.5, 0.41]), 6.627, [6.5, 7.2, 5.4, 6.8, 6.3, 7.1, 6.6, 7.1], 0.402
    )
    return core, dense, best


def _report(results) -> Report:
    core, dense, best = results
    params = {"w_sum": 0.45, "w_count": 0.55, "threshold": 0.4, "top_k": 100}
    rows = [
        make_row("dense", dense, coreinfer=core, dense=dense),
        make_row("CoreInfer", core, coreinfer=core, dense=dense),
        make_row("levels #6", best, coreinfer=core, dense=dense, params=params),
    ]
    return Report(
        title="llama3-3b on truthfulqa",
        model="llama3-3b",
        task="truthfulqa",
        metric="bleu_max",
        sections=[ReportSection("Full dataset", rows, note="all 817 questions")],
        meta={"samples": 8, "seed": 42, "goal": 0.4},
        notes=["dequantized weights"],
    )


def test_percent_math():
    assert percent_of(6.627, 6.33) == pytest.approx(104.69, abs=0.01)
    assert percent_of(3.81, 4.185) == pytest.approx(91.04, abs=0.01)
    assert percent_of(1.0, 0.0) is None
    assert percent_of(-1.0, -2.0) is None
    assert percent_of(None, 1.0) is None


def test_make_row(results):
    core, dense, best = results
    row = make_row("levels", best, coreinfer=core, dense=dense)
    assert row.method == "levels"
    assert row.planned_keep == pytest.approx(0.4033, abs=1e-4)
    assert row.density == 0.402
    assert row.pct_coreinfer == pytest.approx(100 * 6.627 / 6.33)
    assert row.pct_dense == pytest.approx(100 * 6.627 / 8.0)
    assert row.diff.n == 8 and row.diff.mean == pytest.approx(0.3)
    assert row.n == 8 and row.stderr > 0
    base = make_row("CoreInfer", core, coreinfer=core)
    assert base.is_baseline and base.verdict == "baseline"
    assert base.keep == 0.4 and base.token_ratio == 0.2 and base.planned_keep == 0.4
    assert base.diff == PairedDiff(0.0, 0.0, 0.0, 8)
    d = make_row("dense", dense)
    assert d.planned_keep == 1.0 and d.density == 1.0 and d.diff is None and d.verdict == ""


def test_make_row_refuses_mismatched_samples(results):
    core, _, best = results
    other = _res(Method.coreinfer(0.4), 6.0, [1.0] * 8, ids=range(10, 18))
    with pytest.raises(SampleMismatchError):
        make_row("levels", best, coreinfer=other)


def test_verdict():
    row = ReportRow("x", "levels", 1.0)
    assert row.verdict == ""
    assert ReportRow("x", "levels", 1.0, diff=PairedDiff(0.2, 0.1, 0.3, 5)).verdict == "better"
    assert ReportRow("x", "levels", 1.0, diff=PairedDiff(-0.2, -0.3, -0.1, 5)).verdict == "worse"
    assert ReportRow("x", "levels", 1.0, diff=PairedDiff(0.1, -0.1, 0.3, 5)).verdict == "unclear"


def test_markdown_has_rows_labels_and_percentages(results):
    md = to_markdown(_report(results))
    assert md.startswith("# llama3-3b on truthfulqa")
    assert KEPT_HEADER in md and DENSITY_HEADER in md
    lines = md.splitlines()
    best = next(line for line in lines if line.startswith("| levels #6 |"))
    cells = [c.strip() for c in best.strip("|").split("|")]
    assert cells[1] == "[0.45, 0.55, 0.4, 100]"
    assert cells[2] == "0.403" and cells[3] == "0.402"
    assert cells[4] == "6.627"
    assert cells[5] == "104.7%"
    assert cells[6] == "82.8%"
    assert cells[7].startswith("+0.300 [+0.")
    assert cells[9] == "8"
    core = next(line for line in lines if line.startswith("| CoreInfer |"))
    assert "keep 0.4, token ratio 0.2" in core and "100.0%" in core and "baseline" in core
    dense = next(line for line in lines if line.startswith("| dense |"))
    assert "| 1.000 | 1.000 | 8 |" in dense
    assert "## Full dataset" in md and "all 817 questions" in md
    assert "- **goal**: 0.4" in md and "- dequantized weights" in md
    # Every table line has the same number of cells as the header.
    table = [line for line in lines if line.startswith("|")]
    assert len({line.count(" | ") for line in table if not line.startswith("|---")}) == 1


def test_json_round_trips(results, tmp_path):
    report = _report(results)
    d = to_json(report)
    again = from_json(json.loads(json.dumps(d, allow_nan=False)))
    assert again == report
    md_path, json_path = write_report(report, tmp_path / "studies" / "s1")
    assert md_path.name == "report.md" and json_path.name == "report.json"
    assert md_path.read_text() == to_markdown(report)
    assert from_json(json.loads(json_path.read_text())) == report


def test_json_with_missing_values():
    row = ReportRow("x", "levels", float("nan"), planned_keep=None)
    report = Report("t", "m", "k", "acc", [ReportSection("s", [row])])
    d = json.loads(json.dumps(to_json(report), allow_nan=False))
    assert d["sections"][0]["rows"][0]["value"] is None
    back = from_json(d).sections[0].rows[0]
    assert back.value != back.value  # NaN again
    assert "| x | — | — | — | — |" in to_markdown(report)


def test_rich_table_renders(results):
    report = _report(results)
    table = rows_table(report.sections[0].rows, "Full dataset", "bleu_max")
    console = Console(record=True, width=250)
    console.print(table)
    text = console.export_text()
    assert "Full dataset" in text
    headers = [" ".join(c.header.plain.split()) for c in table.columns]
    assert KEPT_HEADER in headers and DENSITY_HEADER in headers
    assert "'sparsity')" in text and "density" in text
    assert "[0.45, 0.55, 0.4, 100]" in text  # not eaten as rich markup
    assert "104.7%" in text and "6.627" in text


def test_levels_table():
    table = levels_table([5, 6, 7, 8], [None, 0.25, 0.5, 1.0], width=8, title="levels")
    console = Console(record=True, width=100)
    console.print(table)
    text = console.export_text()
    lines = text.splitlines()
    assert "dense" in text and "0.25" in text
    assert next(line for line in lines if " 6 " in line).count("█") == 2
    assert next(line for line in lines if " 7 " in line).count("█") == 4
    assert next(line for line in lines if " 8 " in line).count("█") == 8
    assert "mean kept 0.583 over 3 sparse layers" in " ".join(text.split())
    with pytest.raises(ConfigError):
        levels_table([1, 2], [0.4])


def test_trial_lines_as_tune_prints_them():
    from autosparse.tuning import TrialReport

    done = TrialReport(
        3, {"w_sum": 0.5, "top_k": 25}, 0.4, None, 0.55, "COMPLETE", 0.6, 1,
        {"mean": 0.1, "low": -0.2, "high": 0.3},
    )  # fmt: skip
    assert trial_line(done, "acc") == (
        "trial   3 complete  w_sum=0.50 top_k=25 threshold=nan  kept 0.400 realized -  "
        "acc 0.55  vs CoreInfer +0.1 [-0.2, +0.3]  best 0.6 (#1)"
    )
    pruned = TrialReport(4, {}, None, 0.3, None, "PRUNED", None, None, None)
    assert trial_line(pruned, "bleu_max") == (
        "trial   4   pruned  w_sum=0.00 top_k=- threshold=nan  kept - realized 0.300  "
        "bleu_max -  best -"
    )


def test_study_tables_show_spec_baselines_and_trials():
    trial = TrialRow(
        number=1, state="complete", feasible=False,
        params={"w_sum": 0.4, "w_count": 0.6, "threshold": 0.1234, "top_k": 50},
        achieved=0.401, density=float("nan"), value=0.39951,
        vs_coreinfer={"mean": 0.0123, "low": -0.01, "high": 0.03}, samples=2, seconds=3.21,
    )  # fmt: skip
    summary = StudySummary(
        name="s", model_id="m", task="t", goal=0.4, strategy="solve", screen=3,
        calibration=None, baselines={"coreinfer": {"score": 0.51234, "density": 0.39}},
        trials=[trial],
    )  # fmt: skip
    console = Console(width=200, record=True)
    for renderable in study_tables(summary):
        console.print(renderable)
    text = console.export_text()
    assert "coreinfer on screen  0.5123 (realized density 0.390)" in text
    assert "calibration          None" in text and "Trials of s" in text
    row = next(line for line in text.splitlines() if "infeasible" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells == [
        "1", "complete (infeasible)", "0.40", "0.60", "0.123", "50", "0.401", "-",
        "0.3995", "+0.0123 [-0.01, +0.03]", "2", "3.2",
    ]  # fmt: skip
