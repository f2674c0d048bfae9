"""Report rows, rich tables, Markdown and JSON, on numbers from the seed's tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from rich.console import Console

from autosparse.errors import ConfigError
from autosparse.methods import Method
from autosparse.report import (
    DENSITY_HEADER,
    DETECTABLE_HEADER,
    KEPT_HEADER,
    NEEDED_HEADER,
    Report,
    ReportRow,
    ReportSection,
    StudySummary,
    TrialRow,
    detectable_cell,
    from_json,
    interval_cell,
    levels_table,
    make_row,
    needed_cell,
    percent_of,
    power_text,
    rows_table,
    study_tables,
    to_json,
    to_markdown,
    trial_line,
    verdict_of,
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


# ----------------------------------------------------------------- power figures

Z_95_80 = 1.959963984540054 + 0.8416212335729143  # z_0.975 + z_0.8


def _unclear_report() -> tuple[Report, list[float]]:
    """CoreInfer, a setting whose gain is unclear, and one with identical answers."""
    ids = list(range(10))
    core_scores = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    lv_scores = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    core = _res(Method.coreinfer(0.4), 0.4, core_scores, ids=ids)
    lv = _res(Method.levels([0.4, 0.4]), 0.5, lv_scores, ids=ids)
    same = _res(Method.levels([0.3, 0.5]), 0.4, list(core_scores), ids=ids)
    rows = [
        make_row("CoreInfer", core, coreinfer=core),
        make_row("levels #1", lv, coreinfer=core),
        make_row("levels #2", same, coreinfer=core),
    ]
    report = Report("t", "m", "k", "acc", [ReportSection("Held-out (10 documents)", rows)])
    return report, [a - b for a, b in zip(lv_scores, core_scores, strict=True)]


def _md_row(md: str, label: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_shows_detectable_difference_and_docs_to_resolve(results):
    report, d = _unclear_report()
    sd = float(np.std(d, ddof=1))
    detectable = Z_95_80 * sd / math.sqrt(len(d))
    needed = math.ceil((Z_95_80 * sd / float(np.mean(d))) ** 2)
    row = report.sections[0].rows[1]
    assert row.verdict == "unclear"
    assert row.detectable == pytest.approx(detectable) and row.docs_to_resolve == needed
    md = to_markdown(report)
    header = _md_row(md, "setting")
    assert (
        header[-2:]
        == [DETECTABLE_HEADER, NEEDED_HEADER]
        == ["detectable (80% power)", "docs to resolve"]
    )
    cells = _md_row(md, "levels #1")
    assert cells[-2:] == [f"±{detectable:.3f}", str(needed)]
    assert _md_row(md, "levels #2")[-2:] == ["no spread", "∞"]  # identical answers
    assert _md_row(md, "CoreInfer")[-2:] == ["—", "—"]
    assert "docs/statistics.md" in md
    # A resolved row has a detectable difference but nothing to resolve.
    best = _md_row(to_markdown(_report(results)), "levels #6")
    core, _, lv = results
    gain = np.subtract(lv.sample_scores, core.sample_scores)
    expected = Z_95_80 * np.std(gain, ddof=1) / math.sqrt(gain.size)
    assert best[8] == "better" and best[-2:] == [f"±{expected:.3f}", "—"]


def test_report_json_carries_the_power_figures_and_old_json_loads(results):
    report, d = _unclear_report()
    data = json.loads(json.dumps(to_json(report), allow_nan=False))
    stored = data["sections"][0]["rows"][1]["diff"]
    assert stored["sd"] == pytest.approx(np.std(d, ddof=1))
    assert stored["detectable"] == pytest.approx(report.sections[0].rows[1].detectable)
    assert stored["needed"] == report.sections[0].rows[1].docs_to_resolve
    back = from_json(data)
    assert back == report
    assert [r.diff.sd for r in back.sections[0].rows] == [
        r.diff.sd for r in report.sections[0].rows
    ]
    # A report written before the power figures: its diffs have no sd.
    for row in data["sections"][0]["rows"]:
        for key in ("sd", "power", "detectable", "needed"):
            row["diff"].pop(key)
    old = from_json(data)
    assert old.sections[0].rows[1].verdict == "unclear"
    assert old.sections[0].rows[1].detectable is None
    assert _md_row(to_markdown(old), "levels #1")[-2:] == ["—", "—"]


def test_rich_table_shows_the_power_figures():
    report, d = _unclear_report()
    table = rows_table(report.sections[0].rows, "Held-out", "acc")
    headers = [" ".join(c.header.plain.split()) for c in table.columns]
    assert DETECTABLE_HEADER in headers and "verdict (docs to resolve)" in headers
    # the detectable difference stands beside the interval
    assert headers.index(DETECTABLE_HEADER) == headers.index("Δ vs CoreInfer [95% CI]") + 1
    console = Console(record=True, width=250)
    console.print(table)
    text = console.export_text()
    needed = report.sections[0].rows[1].docs_to_resolve
    assert f"unclear ({needed})" in text and "unclear (∞)" in text and "no spread" in text
    # a 120-column terminal still shows every column, n last
    narrow = Console(record=True, width=120)
    narrow.print(table)
    lines = narrow.export_text().splitlines()
    row = next(line for line in lines if line.startswith(" levels #1"))
    assert row.rstrip().endswith(" 10") and f"±{report.sections[0].rows[1].detectable:.3f}" in row


def test_cell_helpers_take_stored_dicts():
    new = PairedDiff(0.02, -0.0215, 0.0612, 200, sd=0.3)
    for diff in (new, new.to_dict()):
        assert interval_cell(diff) == "+0.0200 [-0.0215, +0.0612]"
        # the interval's decimals
        assert detectable_cell(diff) == f"±{Z_95_80 * 0.3 / math.sqrt(200):.4f}" == "±0.0594"
        needed = math.ceil((Z_95_80 * 0.3 / 0.02) ** 2)
        assert needed_cell(diff) == str(needed)
        assert power_text(diff) == f"detectable {detectable_cell(diff)}, {needed} docs to resolve"
        assert verdict_of(diff) == "unclear"
    old = {"mean": 0.02, "low": -0.0215, "high": 0.0612, "n": 200}  # a trial stored before sd
    assert detectable_cell(old) == needed_cell(old) == "—" and power_text(old) == ""
    assert interval_cell(old) == "+0.0200 [-0.0215, +0.0612]"
    better = PairedDiff(0.2, 0.1, 0.3, 50, sd=0.4)
    assert needed_cell(better) == "—" and power_text(better).startswith("detectable ±")
    assert power_text(PairedDiff(0.0, 0.0, 0.0, 30, sd=0.0)) == "same score on every sample"
    assert power_text(PairedDiff(0.1, 0.1, 0.1, 30, sd=0.0)) == "same difference on every sample"
    assert power_text(PairedDiff(0.0, -0.1, 0.1, 30, sd=0.2)).endswith(", ∞ docs to resolve")
    for missing in (None, {}):
        assert interval_cell(missing) == detectable_cell(missing) == needed_cell(missing) == "—"
        assert verdict_of(missing) == ""
    assert detectable_cell(PairedDiff(0.5, 0.5, 0.5, 1)) == "—"  # one pair: no spread known


def test_trial_lines_as_tune_prints_them():
    from autosparse.tuning import TrialReport

    done = TrialReport(
        3, {"w_sum": 0.5, "top_k": 25}, 0.4, None, 0.55, "COMPLETE", 0.6, 1,
        {"mean": 0.1, "low": -0.2, "high": 0.3, "n": 50},
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
        vs_coreinfer={"mean": 0.0123, "low": -0.01, "high": 0.03, "n": 2}, samples=2, seconds=3.21,
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
        "0.3995", "+0.0123 [-0.01, +0.03]", "—", "—", "2", "3.2",
    ]  # fmt: skip


def test_study_table_and_trial_line_show_power_figures():
    from autosparse.tuning import TrialReport

    # an unclear gain with a known spread: 40 pairs, sd 0.5 -> detectable 2.80 * 0.5 / sqrt(40)
    diff = PairedDiff(0.05, -0.1, 0.2, 40, sd=0.5).to_dict()
    detectable = Z_95_80 * 0.5 / 40**0.5
    needed = math.ceil((Z_95_80 * 0.5 / 0.05) ** 2)
    trial = TrialRow(
        number=2, state="complete", feasible=True, params={"w_sum": 0.4, "top_k": 50},
        achieved=0.4, density=0.38, value=0.5, vs_coreinfer=diff, samples=40, seconds=1.0,
    )  # fmt: skip
    summary = StudySummary(
        name="s", model_id="m", task="t", goal=0.4, strategy="solve", screen=40,
        calibration=None, baselines={}, trials=[trial],
    )  # fmt: skip
    console = Console(width=220, record=True)
    for renderable in study_tables(summary):
        console.print(renderable)
    text = console.export_text()
    assert "detectable (80% power)" in text and "docs to resolve" in text
    row = next(line for line in text.splitlines() if line.strip("│ ").startswith("2 "))
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[10] == detectable_cell(diff) and abs(float(cells[10][1:]) - detectable) < 0.01
    assert cells[11] == str(needed)
    report = TrialReport(
        2, {"w_sum": 0.4, "top_k": 50}, 0.4, 0.38, 0.5, "COMPLETE", 0.5, 2, diff
    )  # fmt: skip
    line = trial_line(report, "acc")
    assert f"detectable {detectable_cell(diff)}, {needed} docs to resolve" in line


def test_columns_name_the_griffin_baseline_a_study_compares_with():
    from autosparse.tuning import TrialReport

    ids = list(range(6))
    base = _res(Method.coreinfer(0.4, selector="griffin"), 0.4, [1.0, 0, 1, 0, 1, 0], ids=ids)
    lv = _res(Method.levels([0.4, 0.4], selector="griffin"), 0.4, [1.0, 1, 1, 0, 1, 0], ids=ids)
    rows = [
        make_row("GRIFFIN keep=0.4", base, coreinfer=base),
        make_row("levels #1", lv, coreinfer=base),
    ]
    report = Report("t", "m", "k", "acc", [ReportSection("Held-out", rows)])
    md = to_markdown(report)
    header = next(x for x in md.splitlines() if x.startswith("| setting |"))
    assert "Δ vs GRIFFIN [95% CI]" in header and "% of GRIFFIN" in header
    assert "CoreInfer [" not in header and "% of CoreInfer" not in header
    table = rows_table(rows, "Held-out", "acc")
    headers = [" ".join(c.header.plain.split()) for c in table.columns]
    assert "Δ vs GRIFFIN [95% CI]" in headers and "% of GRIFFIN" in headers
    assert headers.index(DETECTABLE_HEADER) == headers.index("Δ vs GRIFFIN [95% CI]") + 1
    # a CoreInfer baseline keeps its names
    core_md = to_markdown(_unclear_report()[0])
    assert "Δ vs CoreInfer [95% CI]" in core_md and "% of CoreInfer" in core_md
    line = trial_line(
        TrialReport(1, {"w_sum": 0.5, "top_k": 25}, 0.4, None, 0.5, "COMPLETE", 0.5, 1,
                    {"mean": 0.1, "low": -0.2, "high": 0.3, "n": 50}, baseline="GRIFFIN"),
        "acc",
    )  # fmt: skip
    assert "vs GRIFFIN +0.1 [-0.2, +0.3]" in line and "CoreInfer" not in line
