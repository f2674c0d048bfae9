"""Result rows -> rich tables, Markdown and JSON reports (the seed's tables, made honest).

Every table names the keep number unambiguously: "kept (CoreInfer 'sparsity')" is the
planned mean fraction of FFN neurons kept per sparse layer (what CoreInfer's code and the
seed's tables call "sparsity"), "realized density" is what decode actually ran.

rich is imported inside the functions that build tables, so importing this module is cheap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autosparse.errors import ConfigError
from autosparse.results import EvalResult
from autosparse.stats import POWER, PairedDiff, mean_and_stderr, paired_difference

if TYPE_CHECKING:
    from rich.table import Table

KEPT_HEADER = "kept (CoreInfer 'sparsity')"
DENSITY_HEADER = "realized density"
PARAMS_HEADER = "params [w_sum, w_count, threshold, top_k]"
PARAM_NAMES = ("w_sum", "w_count", "threshold", "top_k")
DETECTABLE_HEADER = f"detectable ({POWER:.0%} power)"
NEEDED_HEADER = "docs to resolve"

LEGEND = (
    f"**{KEPT_HEADER}**: planned mean fraction of FFN neurons kept per sparse layer; "
    "CoreInfer's code and the seed's tables call this number 'sparsity' "
    "(0.4 keeps 40% of the neurons). "
    f"**{DENSITY_HEADER}**: fraction of FFN neurons decode actually ran, averaged over "
    "sequences (it can fall below the planned keep on ReLU models). "
    "**% of CoreInfer / % of dense**: metric / reference metric. "
    "**Δ vs CoreInfer**: mean paired difference of per-sample scores on the same samples, "
    "with a bootstrap confidence interval; for corpus-level metrics such as BLEU the "
    "per-sample mean is not the reported score. **verdict**: better or worse when the "
    "interval excludes 0, else unclear. "
    f"**{DETECTABLE_HEADER}**: the smallest true difference from CoreInfer this many paired "
    f"documents would show (interval excluding 0) with probability {POWER:.0%}, from the spread "
    "of the per-document differences (normal approximation; 'no spread' when every document "
    f"differs by the same amount). **{NEEDED_HEADER}**: for an unclear row, roughly how many "
    "paired documents in all would resolve the observed difference at that power, if it is "
    "the true one (∞ for a zero difference). See docs/statistics.md."
)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ReportRow:
    """One evaluated setting. ``method`` is dense, coreinfer or levels. ``params`` holds
    the levels parameters (w_sum, w_count, threshold, top_k) when the row came from them;
    ``keep`` is CoreInfer's uniform keep ratio. ``planned_keep`` is the planned mean keep
    over sparse layers (1.0 for dense); ``density`` the realized one. ``diff`` is the
    paired difference from CoreInfer on per-sample scores; ``is_baseline`` marks the
    CoreInfer row itself. Percentages are None when the reference is missing or not
    positive."""

    label: str
    method: str
    value: float
    n: int = 0
    params: dict[str, Any] | None = None
    keep: float | None = None
    token_ratio: float | None = None
    planned_keep: float | None = None
    density: float | None = None
    pct_coreinfer: float | None = None
    pct_dense: float | None = None
    diff: PairedDiff | None = None
    stderr: float | None = None
    is_baseline: bool = False
    selector: str | None = None  # "griffin" when GRIFFIN chose the neurons, else None

    @property
    def verdict(self) -> str:
        """One of baseline, better, worse, unclear; "" without a paired difference."""
        if self.is_baseline:
            return "baseline"
        return verdict_of(self.diff)

    @property
    def detectable(self) -> float | None:
        """The difference from CoreInfer detectable at 80% power (``PairedDiff.detectable``);
        None for the baseline row, without a paired difference, or without spread."""
        if self.is_baseline or self.diff is None:
            return None
        return self.diff.detectable()

    @property
    def docs_to_resolve(self) -> int | None:
        """For an unclear row, the paired documents in all that would resolve the observed
        difference at 80% power (``PairedDiff.needed``); None otherwise."""
        if self.verdict != "unclear":
            return None
        return self.diff.needed()

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["diff"] = None if self.diff is None else self.diff.to_dict()
        d["params"] = None if self.params is None else dict(self.params)
        return {k: _finite(v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReportRow:
        d = dict(d)
        if d.get("diff") is not None:
            d["diff"] = PairedDiff.from_dict(d["diff"])
        if d.get("value") is None:
            d["value"] = math.nan
        return cls(**d)


@dataclass
class ReportSection:
    """One table: e.g. "Screen (100 samples)" or "Full dataset"."""

    title: str
    rows: list[ReportRow] = field(default_factory=list)
    note: str = ""
    # the metric of this section's values when it is not the report's (a fidelity
    # study's screen section holds its objective, e.g. neg_kl)
    metric: str = ""


@dataclass
class Report:
    """A finalize report: one model, one task, one metric, one or more tables.
    ``meta`` holds free-form facts shown as a list (samples, seed, goal, study, ...)."""

    title: str
    model: str
    task: str
    metric: str
    sections: list[ReportSection] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- building rows


def percent_of(value: float | None, reference: float | None) -> float | None:
    """100 * value / reference, or None when either is missing or not finite, or the
    reference is not positive (a ratio to a negative score reads backwards)."""
    if value is None or reference is None:
        return None
    if not (math.isfinite(value) and math.isfinite(reference)) or reference <= 0:
        return None
    return 100.0 * value / reference


def _planned_keep(method: Mapping[str, Any]) -> float | None:
    keep = method.get("keep")
    if method.get("name") == "dense" or keep is None:
        return 1.0 if method.get("name") == "dense" else None
    if isinstance(keep, (list, tuple)):
        return sum(float(k) for k in keep) / len(keep) if keep else None
    return float(keep)


def make_row(
    label: str,
    result: EvalResult,
    *,
    coreinfer: EvalResult | None = None,
    dense: EvalResult | None = None,
    params: Mapping[str, Any] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    allow_subset: bool = False,
) -> ReportRow:
    """A row for ``result``, compared with the ``coreinfer`` and ``dense`` results when
    given. The paired difference needs both on the same sample ids (SampleMismatchError
    otherwise, unless ``allow_subset``). Pass the levels parameters as ``params``
    (``Method.to_dict()`` does not carry them); a ``params`` entry in the stored method
    dict is used when ``params`` is None."""
    method = dict(result.method)
    name = str(method.get("name", ""))
    if params is None and isinstance(method.get("params"), Mapping):
        params = method["params"]
    diff = None
    if coreinfer is not None and result.sample_scores and coreinfer.sample_scores:
        diff = paired_difference(
            result.sample_ids,
            result.sample_scores,
            coreinfer.sample_ids,
            coreinfer.sample_scores,
            n_boot=n_boot,
            seed=seed,
            level=level,
            allow_subset=allow_subset,
        )
    stderr = None
    if len(result.sample_scores) > 1:
        try:
            stderr = mean_and_stderr(result.sample_scores)[1]
        except ValueError:
            stderr = None
    keep = method.get("keep") if name == "coreinfer" else None
    return ReportRow(
        label=label,
        method=name,
        value=float(result.score),
        n=len(result.sample_ids) or len(result.sample_scores),
        params=None if params is None else dict(params),
        keep=None if keep is None else float(keep),
        token_ratio=None if name == "dense" else method.get("token_ratio"),
        planned_keep=_planned_keep(method),
        density=1.0 if name == "dense" and result.density is None else result.density,
        pct_coreinfer=None if coreinfer is None else percent_of(result.score, coreinfer.score),
        pct_dense=None if dense is None else percent_of(result.score, dense.score),
        diff=diff,
        stderr=stderr,
        is_baseline=coreinfer is not None and result is coreinfer,
        selector=method.get("selector"),
    )


# --------------------------------------------------------------------------- cells


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _missing(v: float | None) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _num(v: float | None) -> str:
    if _missing(v):
        return "—"
    v = float(v)
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def _fixed(v: float | None, digits: int = 3) -> str:
    return "—" if _missing(v) else f"{float(v):.{digits}f}"


def _pct(v: float | None) -> str:
    return "—" if _missing(v) else f"{v:.1f}%"


def _decimals(*values: float, significant: int = 3) -> int:
    """Decimals that give the largest value ``significant`` significant digits."""
    top = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    if top == 0.0:
        return significant
    return max(0, significant - 1 - math.floor(math.log10(top)))


def _is_vector(params: Mapping[str, Any] | None) -> bool:
    """Whether ``params`` are a free-space keep vector (every name ``keep_<layer>``)."""
    return bool(params) and all(k.startswith("keep_") and k[5:].isdigit() for k in params)


def vector_text(params: Mapping[str, Any]) -> str:
    """A free-space vector in layer order, e.g. ``levels 6-9: 0.4 0.425 0.375 0.4``."""
    layers = sorted(params, key=lambda k: int(k[5:]))
    span = f"{int(layers[0][5:])}-{int(layers[-1][5:])}" if len(layers) > 1 else layers[0][5:]
    return f"levels {span}: " + " ".join(f"{float(params[k]):g}" for k in layers)


def gap_line(meta: Mapping[str, Any]) -> str:
    """The finalize report's screen-to-held-out gap of the winner as one line ("" without)."""
    gap = meta.get("screen-to-held-out gap")
    if gap is None:
        return ""
    if not isinstance(gap, (int, float)):
        return f"{meta.get('winner', 'winner')}: screen-to-held-out gap {gap}"
    line = (
        f"{meta.get('winner', 'winner')}: screen {meta.get('winner on the screen'):.4g}, "
        f"held out {meta.get('winner held out'):.4g}, screen-to-held-out gap {gap:+.4g}"
    )
    screen_gain = meta.get("winner gain over CoreInfer on the screen")
    held_gain = meta.get("winner gain over CoreInfer held out")
    if screen_gain is not None and held_gain is not None:
        baseline = meta.get("winner gain baseline", "CoreInfer")
        line += f"; gain over {baseline}: screen {screen_gain:+.4g}, held out {held_gain:+.4g}"
        interval = meta.get("winner gain over CoreInfer held out, 95% interval")
        if interval:
            line += f" [{interval[0]:+.4g}, {interval[1]:+.4g}]"
    return line


def _params_cell(row: ReportRow) -> str:
    if row.params:
        if _is_vector(row.params):
            return vector_text(row.params)
        if all(k in row.params for k in PARAM_NAMES):
            return "[" + ", ".join(f"{float(row.params[k]):g}" for k in PARAM_NAMES) + "]"
        return ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.params.items()
        )
    if row.method == "coreinfer" and row.keep is not None:
        q = "" if row.token_ratio is None else f", token ratio {row.token_ratio:g}"
        by = ", GRIFFIN" if row.selector == "griffin" else ""
        return f"keep {row.keep:g}{q}{by}"
    return "—"


# Public cell helpers: every paired interval (report tables, the study's trial table, the
# line printed per trial) is shown with its power figures by the same functions. They take a
# PairedDiff or its stored dict (a trial's "vs_coreinfer" attribute), old or new.


def as_diff(diff: PairedDiff | Mapping[str, Any] | None) -> PairedDiff | None:
    """``diff`` as a PairedDiff: a stored dict is read with ``PairedDiff.from_dict`` (dicts
    from before the power figures give ``sd=None``); None and empty dicts give None."""
    if diff is None or isinstance(diff, PairedDiff):
        return diff
    return PairedDiff.from_dict(dict(diff)) if diff else None


def verdict_of(diff: PairedDiff | Mapping[str, Any] | None) -> str:
    """better or worse when the interval excludes 0, else unclear; "" without one."""
    d = as_diff(diff)
    if d is None:
        return ""
    if d.low > 0:
        return "better"
    if d.high < 0:
        return "worse"
    return "unclear"


def _diff_decimals(d: PairedDiff) -> int:
    return _decimals(d.mean, d.low, d.high)


def interval_cell(diff: PairedDiff | Mapping[str, Any] | None) -> str:
    """``+0.030 [-0.012, +0.071]``: the mean difference and its interval, or "—"."""
    d = as_diff(diff)
    if d is None:
        return "—"
    k = _diff_decimals(d)
    return f"{d.mean:+.{k}f} [{d.low:+.{k}f}, {d.high:+.{k}f}]"


def detectable_cell(diff: PairedDiff | Mapping[str, Any] | None) -> str:
    """``±0.058``: the difference detectable at 80% power, with the interval's decimals.
    "no spread" when every pair differs by the same amount (e.g. identical answers on every
    document); "—" without a difference, with fewer than 2 pairs, or for a difference stored
    before the spread was recorded."""
    d = as_diff(diff)
    if d is None or d.sd is None or d.n < 2:
        return "—"
    value = d.detectable()
    if value is None:
        return "no spread"
    return f"±{value:.{_diff_decimals(d)}f}"


def needed_cell(diff: PairedDiff | Mapping[str, Any] | None) -> str:
    """For an unclear difference, the paired documents in all that would resolve the observed
    mean at 80% power (``PairedDiff.needed``), "∞" when the observed mean is 0; "—" for a
    resolved difference, without one, or when its spread is unknown."""
    d = as_diff(diff)
    if verdict_of(d) != "unclear" or d.sd is None or d.n < 2:
        return "—"
    if d.mean == 0.0:
        return "∞"
    needed = d.needed()
    return "—" if needed is None else str(needed)


def power_text(diff: PairedDiff | Mapping[str, Any] | None) -> str:
    """The power figures as a phrase for a one-line summary, e.g. "detectable ±0.058, 420
    docs to resolve" (the second part only when unclear), "same score on every sample" or
    "same difference on every sample" without spread; "" when there are none."""
    detectable = detectable_cell(diff)
    if detectable == "—":
        return ""
    if detectable == "no spread":
        same = "score" if as_diff(diff).mean == 0.0 else "difference"
        return f"same {same} on every sample"
    needed = needed_cell(diff)
    return f"detectable {detectable}" + ("" if needed == "—" else f", {needed} docs to resolve")


def _diff_cell(row: ReportRow) -> str:
    return "—" if row.is_baseline else interval_cell(row.diff)


def baseline_name(rows: Sequence[ReportRow]) -> str:
    """What the paired columns compare with: the uniform baseline's selector, CoreInfer's
    votes unless a study selects with GRIFFIN's rule."""
    base = next((r for r in rows if r.is_baseline), None)
    return "GRIFFIN" if base is not None and base.selector == "griffin" else "CoreInfer"


def _headers(metric: str, level: float = 0.95, baseline: str = "CoreInfer") -> list[str]:
    return [
        "setting",
        PARAMS_HEADER,
        KEPT_HEADER,
        DENSITY_HEADER,
        metric,
        f"% of {baseline}",
        "% of dense",
        f"Δ vs {baseline} [{level:.0%} CI]",
        "verdict",
        "n",
        # beside n: what this many documents could detect, and how many would resolve
        DETECTABLE_HEADER,
        NEEDED_HEADER,
    ]


def _cells(row: ReportRow) -> list[str]:
    return [
        row.label,
        _params_cell(row),
        _fixed(row.planned_keep),
        _fixed(row.density),
        _num(row.value),
        _pct(row.pct_coreinfer),
        _pct(row.pct_dense),
        _diff_cell(row),
        row.verdict or "—",
        str(row.n) if row.n else "—",
        "—" if row.is_baseline else detectable_cell(row.diff),
        "—" if row.is_baseline else needed_cell(row.diff),
    ]


def _level_of(rows: Sequence[ReportRow]) -> float:
    return next((r.diff.level for r in rows if r.diff is not None), 0.95)


# --------------------------------------------------------------------------- rich


_RICH_BREAKS = {
    PARAMS_HEADER: "params\n[w_sum, w_count,\nthreshold, top_k]",
    KEPT_HEADER: "kept\n(CoreInfer\n'sparsity')",
    DENSITY_HEADER: "realized\ndensity",
    "% of dense": "% of\ndense",
    DETECTABLE_HEADER: DETECTABLE_HEADER.replace(" ", "\n"),
    "verdict": "verdict\n(" + NEEDED_HEADER.replace(" to ", " to\n") + ")",
}
# Columns that may wrap at spaces (the others hold numbers, never cut), with minimum widths.
_TEXT_COLUMNS = {"setting": 9, PARAMS_HEADER: 9, "verdict": 8}
_LEFT = {"setting", PARAMS_HEADER, "verdict"}
_VERDICT_STYLE = {"better": "green", "worse": "red", "baseline": "dim"}


def rows_table(rows: Sequence[ReportRow], title: str, metric: str) -> Table:
    """A rich table of ``rows`` with the numbers of the Markdown report. To fit a 120-column
    terminal, the detectable difference stands beside the interval and the documents to
    resolve an unclear row go into its verdict cell ("unclear (374)")."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAVY, pad_edge=False)
    baseline = baseline_name(rows)
    headers = _headers(metric, _level_of(rows), baseline)
    order = [h for h in headers if h not in (DETECTABLE_HEADER, NEEDED_HEADER)]
    order.insert(order.index("verdict"), DETECTABLE_HEADER)
    for h in order:
        # Headers break at chosen places. On a narrow terminal the text columns wrap at
        # spaces while numbers are never cut; the interval wraps after its mean.
        pct = f"% of {baseline}"
        breaks = {**_RICH_BREAKS, pct: pct.replace("of ", "of\n")}
        header = Text(breaks.get(h, h.replace(f"{baseline} [", f"{baseline}\n[")))
        interval = h.startswith(f"Δ vs {baseline}")
        table.add_column(
            header,
            justify="left" if h in _LEFT else "right",
            no_wrap=not (h in _TEXT_COLUMNS or interval),
            min_width=8 if interval else _TEXT_COLUMNS.get(h),
            overflow="fold",
        )
    verdict_at = order.index("verdict")
    for row in rows:
        by_header = dict(zip(headers, _cells(row), strict=True))
        needed = by_header[NEEDED_HEADER]
        if needed != "—":
            by_header["verdict"] += f" ({needed})"
        cells = [Text(by_header[h]) for h in order]  # Text: "[0.4, ...]" is not rich markup
        style = _VERDICT_STYLE.get(row.verdict)
        if style:
            cells[verdict_at].stylize(style)
        table.add_row(*cells)
    return table


def report_tables(report: Report) -> list[Table]:
    """One rich table per section."""
    return [rows_table(s.rows, s.title, s.metric or report.metric) for s in report.sections]


_BLOCKS = " ▏▎▍▌▋▊▉█"


def _bar(fraction: float, width: int) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (_BLOCKS[part] if part else "")).ljust(width)


def levels_table(
    layers: Sequence[int],
    levels: Sequence[float | None],
    *,
    width: int = 40,
    title: str | None = None,
) -> Table:
    """Per-layer keep ratios with a text bar each. A level of None marks a layer that
    runs dense. The caption gives the mean over the sparse layers."""
    from rich.table import Table
    from rich.text import Text

    if len(layers) != len(levels):
        raise ConfigError(f"{len(layers)} layers but {len(levels)} levels")
    table = Table(title=title, title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("kept", justify="right")
    table.add_column("", justify="left", no_wrap=True)
    sparse = []
    for layer, lv in zip(layers, levels, strict=True):
        if lv is None:
            table.add_row(str(layer), "dense", Text(_bar(1.0, width), style="dim"))
            continue
        sparse.append(float(lv))
        table.add_row(str(layer), f"{float(lv):.2f}", Text(_bar(float(lv), width), style="cyan"))
    if sparse:
        table.caption = (
            f"mean kept {sum(sparse) / len(sparse):.3f} over {len(sparse)} sparse layers"
        )
    return table


# --------------------------------------------------------------------------- studies


@dataclass(frozen=True)
class TrialRow:
    """One trial of a study as ``show`` lists it. ``state`` is Optuna's, lower case;
    ``achieved`` the mean planned keep of its levels, ``density`` the realized one;
    ``vs_coreinfer`` the paired difference ({mean, low, high}) on the screen."""

    number: int
    state: str
    feasible: bool
    params: dict[str, Any]
    achieved: float | None
    density: float | None
    value: float | None
    vs_coreinfer: dict[str, float] | None
    samples: int
    seconds: float | None


@dataclass(frozen=True)
class StudySummary:
    """A study's spec, its baselines on the screen ({label: {score, density, ...}}) and
    its trials."""

    name: str
    model_id: str | None
    task: str | None
    goal: float | None
    strategy: str | None
    screen: int
    calibration: str | None
    baselines: dict[str, dict[str, Any]]
    trials: list[TrialRow]
    selector: str = "coreinfer"
    space: str = "formula"


def _dash(x: float | None, digits: int = 3) -> str:
    """Fixed-point, or "-" for a missing or non-finite number."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def _gain(d: Mapping[str, float] | None) -> str:
    return "-" if not d else f"{d['mean']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}]"


def study_tables(summary: StudySummary) -> list[Any]:
    """Two renderables: the study's spec and baselines, and a table of its trials."""
    from rich.table import Table

    header = Table.grid(padding=(0, 2))
    for k, v in (
        ("model", summary.model_id),
        ("task", summary.task),
        ("goal (mean keep)", summary.goal),
        ("space", summary.space),
        ("strategy", summary.strategy if summary.space == "formula" else "-"),
        ("screen", summary.screen),
        ("calibration", summary.calibration),
    ):
        header.add_row(f"[bold]{k}", str(v))
    if summary.selector != "coreinfer":
        header.add_row(
            "[bold]selector", f"{summary.selector} (the coreinfer baseline and every trial)"
        )
    for label, b in summary.baselines.items():
        header.add_row(
            f"[bold]{label} on screen",
            f"{b['score']:.4g} (realized density {_dash(b['density'])})",
        )
    table = Table(title=f"Trials of {summary.name}")
    free = summary.space == "free"
    params_cols = ("levels by layer",) if free else ("w_sum", "w_count", "threshold", "top_k")
    for col in (
        "#",
        "state",
        *params_cols,
        "kept (mean level)",
        "realized density",
        "value",
        f"Δ vs {'GRIFFIN' if summary.selector == 'griffin' else 'CoreInfer'} [95% CI]",
        "detectable (80% power)",
        "docs to resolve",
        "samples",
        "s",
    ):
        table.add_column(col, justify="right")
    for t in summary.trials:
        p = t.params
        if free:
            cells = (vector_text(p).split(": ", 1)[1] if _is_vector(p) else "-",)
        else:
            cells = (
                "-" if p.get("w_sum") is None else f"{p['w_sum']:.2f}",
                "-" if p.get("w_count") is None else f"{p['w_count']:.2f}",
                "-" if p.get("threshold") is None else f"{p['threshold']:.3f}",
                str(p.get("top_k", "-")),
            )
        table.add_row(
            str(t.number),
            t.state + ("" if t.feasible else " (infeasible)"),
            *cells,
            _dash(t.achieved),
            _dash(t.density),
            "-" if t.value is None else f"{t.value:.4g}",
            _gain(t.vs_coreinfer),
            detectable_cell(t.vs_coreinfer),
            needed_cell(t.vs_coreinfer),
            str(t.samples),
            "-" if t.seconds is None else f"{t.seconds:.1f}",
        )
    return [header, table]


def trial_line(r: Any, metric: str) -> str:
    """One line for a trial as ``tune`` reports it (``r``: a ``tuning.TrialReport``)."""
    p = r.params or {}
    gain = ""
    if r.vs_baseline:
        power = power_text(r.vs_baseline)
        gain = f"  vs {getattr(r, 'baseline', 'CoreInfer')} {_gain(r.vs_baseline)}" + (
            f" ({power})" if power else ""
        )
    value = "-" if r.value is None else f"{r.value:.4g}"
    best = "-" if r.best is None else f"{r.best:.4g} (#{r.best_number})"
    if _is_vector(p):
        setting = vector_text(p)
    else:
        setting = (
            f"w_sum={p.get('w_sum', 0):.2f} top_k={p.get('top_k', '-')} "
            f"threshold={p.get('threshold', float('nan')):.3f}"
        )
    return (
        f"trial {r.number:>3} {r.state.lower():>8}  {setting}  "
        f"kept {_dash(r.achieved)} realized {_dash(r.density)}  {metric} {value}{gain}  "
        f"best {best}"
    )


# --------------------------------------------------------------------------- markdown / json


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(rows: Sequence[ReportRow], metric: str) -> list[str]:
    headers = _headers(metric, _level_of(rows), baseline_name(rows))
    lines = [
        "| " + " | ".join(_md_escape(h) for h in headers) + " |",
        "|" + "|".join("---" if h in _LEFT else "---:" for h in headers) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_md_escape(c) for c in _cells(row)) + " |")
    return lines


def to_markdown(report: Report) -> str:
    """The report as Markdown: title, facts, one table per section, legend, notes."""
    out = [f"# {report.title}", ""]
    facts = {"model": report.model, "task": report.task, "metric": report.metric, **report.meta}
    out += [f"- **{k}**: {v}" for k, v in facts.items() if v is not None and v != ""]
    out.append("")
    for section in report.sections:
        out += [f"## {section.title}", ""]
        if section.note:
            out += [section.note, ""]
        out += _md_table(section.rows, section.metric or report.metric)
        out.append("")
    out += [LEGEND, ""]
    if report.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    return "\n".join(out)


def to_json(report: Report) -> dict[str, Any]:
    """The report as a JSON-able dict (non-finite numbers become null); ``from_json``
    reads it back."""
    return {
        "title": report.title,
        "model": report.model,
        "task": report.task,
        "metric": report.metric,
        "meta": json.loads(json.dumps(report.meta, default=str)),
        "notes": list(report.notes),
        "sections": [
            {
                "title": s.title,
                "note": s.note,
                "metric": s.metric,
                "rows": [r.to_dict() for r in s.rows],
            }
            for s in report.sections
        ],
    }


def from_json(d: Mapping[str, Any]) -> Report:
    """Inverse of ``to_json``."""
    return Report(
        title=d["title"],
        model=d["model"],
        task=d["task"],
        metric=d["metric"],
        meta=dict(d.get("meta") or {}),
        notes=list(d.get("notes") or []),
        sections=[
            ReportSection(
                title=s["title"],
                note=s.get("note", ""),
                metric=s.get("metric", ""),
                rows=[ReportRow.from_dict(r) for r in s.get("rows", [])],
            )
            for s in d.get("sections", [])
        ],
    )


def write_report(report: Report, directory: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.json`` into ``directory`` (created if needed);
    returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    md_path = directory / "report.md"
    json_path = directory / "report.json"
    md_path.write_text(to_markdown(report), encoding="utf-8")
    json_path.write_text(
        json.dumps(to_json(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        encoding="utf-8",
    )
    return md_path, json_path
