"""Quality against kept fraction: one study per goal, every method on the same held-out
documents, a plot, and the iso-quality saving.

A sweep tunes (or resumes) one study per goal with the options ``tune`` takes, then
evaluates dense, CoreInfer at each goal as its keep (and at the baseline keep), and the
tuned levels of every study (its best trial and the AVG of its top-k trials) on one set
of held-out documents. The **iso-quality saving** is the realized density at which the
tuned curve reaches the quality of CoreInfer at the baseline keep (linear interpolation),
with a bootstrap over documents for its uncertainty (``iso_quality``, a pure function).

Every evaluation is cached in one result store for the sweep (``studies/NAME/results.db``
by default, or the ``--storage`` database), so a rerun recomputes nothing. An evaluation
missing there is also looked up in each study's own database, where ``finalize`` stores
its evaluations.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autosparse.errors import ConfigError
from autosparse.methods import Method, uniform_label
from autosparse.results import EvalResult

if TYPE_CHECKING:
    from rich.table import Table

    from autosparse.report import ReportRow
    from autosparse.tuning import StudySpec

#: the series a sweep draws; the iso-quality saving is stated for each tuned one
DENSE, COREINFER, TUNED_BEST, TUNED_AVG = "dense", "coreinfer", "tuned-best", "tuned-avg"
TUNED_SERIES = (TUNED_AVG, TUNED_BEST)
#: the tuned series whose saving is the sweep's headline: chosen before seeing any held-out
#: number (picking the better of the two afterwards would select on the held-out data)
HEADLINE = TUNED_AVG
SERIES_LABELS = {
    DENSE: "dense",
    COREINFER: "CoreInfer",
    TUNED_BEST: "tuned levels: best trial",
    TUNED_AVG: "tuned levels: AVG of top-k",
}
DEFAULT_GOALS = (0.3, 0.4, 0.5, 0.6)
# Bound on the bootstrap index matrix (resamples x documents x curves) held at once.
_MAX_CELLS = 4_000_000


# ------------------------------------------------------------------ iso-quality


CROSSED, BELOW, NOT_REACHED = "crossed", "below", "not reached"


def crossing(
    densities: Sequence[float], qualities: Sequence[float], target: float
) -> tuple[float | None, str]:
    """The smallest realized density at which the piecewise-linear curve through the
    points (density, quality), taken in order of density, reaches ``target``.

    Returns (density, "crossed") for an interpolated crossing; (lowest density, "below")
    when the lowest point already reaches the target (the true crossing is at or below
    it: the curve is not extrapolated); (None, "not reached") when no point reaches it."""
    points = sorted(zip(densities, qualities, strict=True), key=lambda p: p[0])
    if not points:
        raise ConfigError("a curve needs at least one point")
    x0, y0 = points[0]
    if y0 >= target:
        return float(x0), BELOW
    for (xa, ya), (xb, yb) in zip(points, points[1:], strict=False):
        if yb >= target:  # ya < target <= yb, so yb > ya
            return float(xa + (target - ya) / (yb - ya) * (xb - xa)), CROSSED
    return None, NOT_REACHED


@dataclass(frozen=True)
class IsoQuality:
    """Where a tuned curve reaches the reference's quality ``target``.

    ``density`` is the crossing on the observed curve (None when not reached; the lowest
    swept density when ``status`` is "below"). ``median``, ``low`` and ``high`` are the
    median and the ``level`` percentile interval of the crossing over ``n_boot``
    resamples of the documents; None stands for "not reached within the swept goals" in
    that share of resamples. ``share_below`` / ``share_not_reached``: fractions of
    resamples in which the lowest point already reached the target / no point did.
    ``reference_density`` is the reference's realized density, the denominator of the
    saving."""

    target: float
    status: str
    density: float | None
    median: float | None
    low: float | None
    high: float | None
    lowest: float
    highest: float
    reference_density: float | None = None
    share_below: float = 0.0
    share_not_reached: float = 0.0
    n_boot: int = 0
    level: float = 0.95

    def saving(self, density: float | None) -> float | None:
        """1 - density / reference density: the fraction of the reference's neurons a
        curve at ``density`` leaves out (None when either is unknown)."""
        ref = self.reference_density
        if density is None or ref is None or not math.isfinite(ref) or ref <= 0:
            return None
        return 1.0 - density / ref

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["saving"] = self.saving(self.density)
        d["saving_median"] = self.saving(self.median)
        # the saving's interval is the crossing's interval read backwards
        d["saving_low"] = self.saving(self.high)
        d["saving_high"] = self.saving(self.low)
        return d


def iso_quality(
    densities: Sequence[float],
    scores: Sequence[Sequence[float]],
    reference: Sequence[float],
    *,
    reference_density: float | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> IsoQuality:
    """The realized density at which a curve reaches the reference's quality, with its
    uncertainty.

    ``densities[p]`` is point p's realized density and ``scores[p]`` its per-document
    scores; ``reference`` holds the reference's scores on the same documents in the same
    order. The target is the reference's mean; each point's quality is its mean. The
    crossing follows ``crossing``. Its uncertainty: resample the documents with
    replacement ``n_boot`` times, recompute every point's mean and the reference's mean,
    recompute the crossing; report the median and the percentile interval at ``level``
    (a resample that never reaches the target counts as +infinity, so an interval end
    beyond the swept goals is None). Densities stay fixed (they are properties of the
    settings, not of the document sample). Deterministic given ``seed``."""
    import numpy as np

    if n_boot < 1:
        raise ConfigError(f"n_boot must be at least 1, got {n_boot}")
    if not (0.0 < level < 1.0):
        raise ConfigError(f"confidence level must be in (0, 1), got {level}")
    x = np.asarray(densities, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64).ravel()
    if x.size == 0:
        raise ConfigError("a curve needs at least one point")
    if s.ndim != 2 or s.shape != (x.size, r.size) or r.size == 0:
        raise ConfigError(
            f"scores must be {x.size} curves x {r.size} documents (the reference's), "
            f"got shape {s.shape}"
        )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(s)) and np.all(np.isfinite(r))):
        raise ConfigError("densities and scores must be finite")
    order = np.argsort(x, kind="stable")
    x, s = x[order], s[order]
    target = float(r.mean())
    density, status = crossing(x.tolist(), s.mean(axis=1).tolist(), target)

    n = r.size
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot, dtype=np.float64)
    below = 0
    chunk = max(1, _MAX_CELLS // (n * (x.size + 1)))
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means = s[:, idx].mean(axis=2)  # (points, resamples)
        targets = r[idx].mean(axis=1)  # (resamples,)
        for j in range(stop - start):
            value, state = crossing(x.tolist(), means[:, j].tolist(), float(targets[j]))
            below += state == BELOW
            values[start + j] = math.inf if value is None else value
    alpha = 1.0 - level
    # inverted_cdf picks resampled values, never an average of a crossing and infinity
    low, median, high = np.quantile(
        values, [alpha / 2.0, 0.5, 1.0 - alpha / 2.0], method="inverted_cdf"
    )

    def finite(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    return IsoQuality(
        target=target,
        status=status,
        density=density,
        median=finite(median),
        low=finite(low),
        high=finite(high),
        lowest=float(x[0]),
        highest=float(x[-1]),
        reference_density=reference_density,
        share_below=below / n_boot,
        share_not_reached=float(np.isinf(values).mean()),
        n_boot=n_boot,
        level=level,
    )


def iso_sentence(iso: IsoQuality, curve: str, reference: str) -> str:
    """One sentence stating where ``curve`` reaches ``reference``'s quality, how sure that
    is, and the saving against the reference's realized density."""

    def where(v: float | None) -> str:
        if v is None:
            return "not reached"
        # a resample that reached the target at the lowest point crossed there or lower
        return f"{'≤' if iso.share_below > 0 and v <= iso.lowest else ''}{v:.3f}"

    def saving(v: float | None) -> str:
        if v is None:  # the crossing lies beyond the highest swept density
            s = iso.saving(iso.highest)
            return "—" if s is None else f"< {s:+.0%}"
        s = iso.saving(v)
        return "—" if s is None else f"{s:+.0%}"

    spread = (
        f"median {where(iso.median)}, {iso.level:.0%} interval [{where(iso.low)}, "
        f"{where(iso.high)}] over {iso.n_boot} resamples of the documents"
    )
    target = f"{reference}'s quality ({iso.target:.4g})"
    if iso.status == NOT_REACHED:
        return (
            f"{curve} does not reach {target}: not reached within the swept goals (highest "
            f"realized density {iso.highest:.3f}; {spread})."
        )
    against = (
        ""
        if iso.reference_density is None
        else f", against {iso.reference_density:.3f} for {reference}"
    )
    if iso.status == BELOW:
        least = (
            ""
            if iso.reference_density is None
            else f": saving at least {saving(iso.density)} of the neurons"
        )
        return (
            f"{curve} already reaches {target} at the lowest swept goal (realized density "
            f"{iso.density:.3f}{against}){least}; sweep lower goals to find the crossing "
            f"({spread})."
        )
    fewer = ""
    if iso.reference_density is not None:
        more = (iso.saving(iso.density) or 0.0) < 0
        fewer = (
            f": saving {saving(iso.density)} of the neurons [{saving(iso.high)}, "
            f"{saving(iso.low)}]" + (f" (negative: more neurons than {reference})" if more else "")
        )
    return (
        f"{curve} reaches {target} at realized density {iso.density:.3f} ({spread}"
        f"{against}){fewer}."
    )


# ------------------------------------------------------------------ the sweep


@dataclass(frozen=True)
class SweepPoint:
    """One evaluated setting: ``goal`` is None for dense and for the reference when the
    baseline keep is not among the goals. ``quality`` is the mean per-document score (the
    curve's y and what the bootstrap resamples); ``row`` the report row (paired difference
    from the reference, % of dense, ...)."""

    goal: float | None
    series: str
    row: ReportRow
    quality: float
    study: str | None = None
    result: EvalResult | None = field(default=None, repr=False, compare=False)

    @property
    def density(self) -> float:
        return 1.0 if self.row.density is None else float(self.row.density)

    def to_dict(self) -> dict[str, Any]:
        row = self.row.to_dict()
        row["method_name"] = row.pop("method")  # dense, coreinfer or levels
        return {
            "goal": self.goal,
            "method": self.series,
            "study": self.study,
            "quality": self.quality,
            **row,
        }


@dataclass
class Sweep:
    """A finished sweep: every point on the same held-out ``ids``, and the iso-quality
    result per tuned series."""

    name: str
    model: str
    task: str
    metric: str
    goals: list[float]
    ids: list[int]
    reference: str  # label of the reference point (CoreInfer at the baseline keep)
    points: list[SweepPoint]
    iso: dict[str, IsoQuality]
    studies: dict[float, str]
    meta: dict[str, Any] = field(default_factory=dict)

    def series(self, name: str) -> list[SweepPoint]:
        return [p for p in self.points if p.series == name and p.goal is not None]

    @property
    def reference_point(self) -> SweepPoint:
        return next(p for p in self.points if p.row.is_baseline)

    @property
    def dense_point(self) -> SweepPoint:
        return next(p for p in self.points if p.series == DENSE)


def default_sweep_name(model: str, task: str, selector: str = "coreinfer") -> str:
    from autosparse.tuning import default_study_name

    stem = default_study_name(model, task, 1.0, None).removesuffix("-g1") + "-sweep"
    return stem if selector == "coreinfer" else f"{stem}-{selector}"


def parse_goals(text: str) -> list[float]:
    """Goals from "0.3,0.4,0.5": at least two distinct keep ratios in (0, 1], sorted."""
    try:
        goals = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--goals must be numbers separated by commas, not {text!r}") from None
    return check_goals(goals)


def check_goals(goals: Sequence[float]) -> list[float]:
    """``goals`` sorted without repeats; ConfigError unless at least two, all in (0, 1]."""
    goals = sorted({float(g) for g in goals})
    if len(goals) < 2:
        raise ConfigError("a sweep needs at least two distinct goals (e.g. --goals 0.3,0.4,0.5)")
    bad = [g for g in goals if not (0.0 < g <= 1.0)]
    if bad:
        raise ConfigError(f"goal {bad[0]:g} is outside (0, 1]: goals are mean keep ratios")
    return goals


class _Stores:
    """Find in the sweep's store, then in the studies' own stores (where a finalize of a
    study keeps its evaluations); save to the sweep's store only."""

    def __init__(self, primary, fallbacks: Sequence[Any] = ()):
        self.primary = primary
        self.fallbacks = list(fallbacks)

    def find(self, model: str, task: str, method: Any, settings: Mapping[str, Any]):
        for store in (self.primary, *self.fallbacks):
            hit = store.find(model, task, method, settings)
            if hit is not None:
                return hit
        return None

    def save(self, result: EvalResult) -> int:
        return self.primary.save(result)


def make_evaluator(
    loaded, spec: StudySpec, store, *, batch_size: int, max_gen_toks: int | None, progress: bool
):
    """The held-out evaluator: the task metric (whatever objective the studies tuned),
    cached in ``store``. The one place the sweep builds an evaluator."""
    from autosparse.tasks.evaluator import TaskEvaluator
    from autosparse.workflow import study_options

    options = study_options(
        spec, batch_size=batch_size, max_gen_toks=max_gen_toks, store=store, progress=progress
    )
    return TaskEvaluator(loaded, options)


def _aligned(result: EvalResult, ids: Sequence[int]) -> list[float]:
    by_id = {int(i): float(s) for i, s in zip(result.sample_ids, result.sample_scores, strict=True)}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ConfigError(f"an evaluation lacks held-out documents {missing[:5]}")
    return [by_id[i] for i in ids]


def run_sweep(
    spec: StudySpec,
    goals: Sequence[float],
    *,
    name: str | None = None,
    storage: str | None = None,
    trials: int = 20,
    timeout: float | None = None,
    device: str = "auto",
    dtype: str = "auto",
    mode: str = "masked",
    batch_size: int = 8,
    max_gen_toks: int | None = None,
    prompt_cache_gb: float = 4.0,
    reference_calibration: bool = False,
    enqueue_reference: bool = False,
    top_k: int = 3,
    limit: int | None = None,
    select: str = "mean",
    n_boot: int = 2000,
    heartbeat: int | None = None,
    on_status: Callable[[str], None] | None = None,
    on_trial: Callable[[Any, str], None] | None = None,
    progress: bool = False,
) -> tuple[Sweep, tuple[Path, Path, Path]]:
    """Tune or resume one study per goal (``spec`` with its goal replaced; studies are
    named and stored as ``tune`` names and stores them), evaluate every method on the
    studies' common held-out documents, and write sweep.md, sweep.json and sweep.png into
    studies/NAME/. The model is loaded once. Raises ConfigError when the studies do not
    hold out the same documents (their seed, screen or calibration differ)."""
    from autosparse import workflow
    from autosparse.finalize import held_out_ids
    from autosparse.store import ResultStore
    from autosparse.tuning import (
        SPEC_ATTR,
        StudySpec,
        default_storage,
        default_study_name,
        load_existing,
        open_storage,
    )

    goals = check_goals(goals)
    if top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    root = workflow.STUDIES_DIR
    name = name or default_sweep_name(spec.model, spec.task, spec.selector)
    say = on_status or (lambda _: None)
    specs = [replace(spec, goal=g, goal_from_baseline=None) for g in goals]

    say(f"loading {spec.model}")
    loaded = workflow.load_quietly(spec.model, device, dtype)
    tuned: dict[float, tuple[str, str]] = {}
    caps: dict[float, int | None] = {}  # each study's cap on new tokens
    for g, goal_spec in zip(goals, specs, strict=True):
        study_name = default_study_name(
            spec.model, spec.task, g, None, selector=spec.selector, space=spec.space
        )
        say(f"goal {g:g}: study {study_name}")
        outcome = workflow.run_tune(
            goal_spec,
            study_name=study_name,
            storage=storage,
            trials=trials,
            timeout=timeout,
            device=device,
            dtype=dtype,
            mode=mode,
            batch_size=batch_size,
            max_gen_toks=max_gen_toks,
            prompt_cache_gb=prompt_cache_gb,
            reference_calibration=reference_calibration,
            enqueue_reference=enqueue_reference,
            on_status=on_status,
            on_trial=on_trial,
            progress=progress,
            loaded=loaded,
            **({} if heartbeat is None else {"heartbeat": heartbeat}),
        )
        tuned[g] = (outcome.study_name, outcome.storage)
        caps[g] = outcome.max_gen_toks
    if len(set(caps.values())) > 1:
        listed = ", ".join(f"goal {g:g}: {c or 'task default'}" for g, c in caps.items())
        raise ConfigError(f"the studies were tuned with different --max-gen-toks ({listed})")
    # held out, generate as many tokens as the screens did
    max_gen_toks = caps[goals[0]]

    out_dir = root / name
    out_dir.mkdir(parents=True, exist_ok=True)
    store_url = storage or default_storage("results", out_dir)
    study_urls = sorted({url for _, url in tuned.values()} - {store_url})
    primary = ResultStore(store_url)
    fallbacks = [ResultStore(url) for url in study_urls]
    try:
        store = _Stores(primary, fallbacks)
        evaluator = make_evaluator(
            loaded,
            spec,
            store,
            batch_size=batch_size,
            max_gen_toks=max_gen_toks,
            progress=progress,
        )
        studies = {}
        held_out: dict[float, list[int]] = {}
        all_ids = evaluator.document_ids()
        for g in goals:
            study_name, url = tuned[g]
            study = load_existing(open_storage(url, heartbeat=None), study_name)
            studies[g] = (study, StudySpec.from_dict(study.user_attrs[SPEC_ATTR]))
            attrs = study.user_attrs
            held_out[g] = held_out_ids(
                all_ids,
                calibration=attrs.get("calibration_ids", ()),
                screen=attrs.get("screen_ids", ()),
                limit=limit,
                seed=spec.seed,
            )
        first = goals[0]
        for g in goals[1:]:
            if held_out[g] != held_out[first]:
                raise ConfigError(
                    f"studies {tuned[first][0]!r} and {tuned[g][0]!r} hold out different "
                    "documents (their calibration or screening samples differ); a sweep "
                    "compares every goal on the same documents: give every study the same "
                    "--seed, --screen and --calibration"
                )
        ids = held_out[first]
        if not ids:
            raise ConfigError("no held-out documents left to evaluate")
        sweep = _evaluate(
            name,
            spec,
            goals,
            studies,
            evaluator,
            ids,
            top_k=top_k,
            select=select,
            mode=mode,
            n_boot=n_boot,
            say=say,
        )
    finally:
        primary.close()
        for s in fallbacks:
            s.close()
    sweep.meta.update(
        {
            "held-out documents": f"{len(ids)} ("
            + (
                "full set minus calibration"
                if limit is None
                else f"seeded sample, seed {spec.seed}"
            )
            + ")",
            "trials per study": trials,
            "screen": spec.screen,
            "objective of the studies": spec.objective,
            "results store": store_url,
        }
    )
    paths = write_sweep(sweep, out_dir)
    return sweep, paths


def _evaluate(
    name: str,
    spec: StudySpec,
    goals: Sequence[float],
    studies: Mapping[float, tuple[Any, StudySpec]],
    evaluator,
    ids: list[int],
    *,
    top_k: int,
    select: str,
    mode: str,
    n_boot: int,
    say: Callable[[str], None],
) -> Sweep:
    """Every point of the sweep on ``ids`` and the iso-quality results."""
    from autosparse.finalize import baseline_text, candidates
    from autosparse.report import make_row

    prepare = getattr(evaluator, "prepare", None)
    if prepare is not None:  # every method below runs on these documents: build them once
        say(f"preparing {len(ids)} held-out documents")
        prepare(ids)

    def run(label: str, method: Method):
        say(f"{label} on {len(ids)} held-out documents")
        return evaluator.run(method, ids)

    def core(keep: float) -> Method:
        return Method.coreinfer(
            keep, spec.token_ratio, layers=spec.layers, mode=mode, selector=spec.selector
        )

    ref_label = uniform_label(spec.baseline_keep, spec.selector)
    reference = run(ref_label, core(spec.baseline_keep))
    dense = run("dense", Method.dense())

    def point(goal, series, label, result, params=None, study=None) -> SweepPoint:
        row = make_row(
            label, result, coreinfer=reference, dense=dense, params=params, seed=spec.seed
        )
        quality = sum(_aligned(result, ids)) / len(ids)
        return SweepPoint(goal, series, row, quality, study, result)

    points = [point(None, DENSE, "dense", dense)]
    if not any(math.isclose(g, spec.baseline_keep) for g in goals):
        points.append(point(None, COREINFER, ref_label, reference))
    for g in goals:
        study, study_spec = studies[g]
        label = uniform_label(g, spec.selector)
        result = reference if math.isclose(g, spec.baseline_keep) else run(label, core(g))
        points.append(point(g, COREINFER, label, result))
        chosen = candidates(study, study_spec, top_k=top_k, select=select, mode=mode)
        best, avg = chosen[0], chosen[-1]
        best_result = run(f"goal {g:g}, {best.label}", best.method)
        points.append(point(g, TUNED_BEST, best.label, best_result, best.params, study.study_name))
        avg_result = best_result if avg is best else run(f"goal {g:g}, {avg.label}", avg.method)
        avg_label = avg.label if avg is not best else f"{best.label} (the only trial)"
        points.append(point(g, TUNED_AVG, avg_label, avg_result, avg.params, study.study_name))

    ref_scores = _aligned(reference, ids)
    iso = {}
    for series in TUNED_SERIES:
        curve = [p for p in points if p.series == series]
        iso[series] = iso_quality(
            [p.density for p in curve],
            [_aligned(p.result, ids) for p in curve],
            ref_scores,
            reference_density=reference.density,
            n_boot=n_boot,
            seed=spec.seed,
        )
    return Sweep(
        name=name,
        model=spec.model_id,
        task=spec.task,
        metric=evaluator.metric,
        goals=list(goals),
        ids=list(ids),
        reference=ref_label,
        points=points,
        iso=iso,
        studies={g: studies[g][0].study_name for g in goals},
        meta={
            "baseline": baseline_text(spec),
            "tuned levels": f"best trial and AVG of the top {top_k} (ranked by "
            + ("screen mean" if select == "mean" else "lower confidence bound vs CoreInfer")
            + ")",
            "seed": spec.seed,
            "layers": spec.layers or "default",
        },
    )


# ------------------------------------------------------------------ outputs


GOAL_HEADER = "goal (mean keep)"


def _headers(sweep: Sweep) -> list[str]:
    from autosparse.report import DENSITY_HEADER, DETECTABLE_HEADER, KEPT_HEADER, NEEDED_HEADER

    level = next((p.row.diff.level for p in sweep.points if p.row.diff is not None), 0.95)
    return [
        GOAL_HEADER,
        "method",
        "setting",
        KEPT_HEADER,
        DENSITY_HEADER,
        sweep.metric,
        "% of dense",
        f"Δ vs {sweep.reference} [{level:.0%} CI]",
        DETECTABLE_HEADER,
        "verdict",
        NEEDED_HEADER,
        "n",
    ]


def _series_label(p: SweepPoint) -> str:
    """The series' name; the uniform series is GRIFFIN's when GRIFFIN chose its neurons."""
    if p.series == COREINFER and p.row.selector == "griffin":
        return "GRIFFIN"
    return SERIES_LABELS[p.series]


#: the columns of _headers written left-aligned (text, not numbers)
_LEFT_HEADERS = ("method", "setting", "verdict")


def _cells(p: SweepPoint) -> list[str]:
    from autosparse.report import detectable_cell, needed_cell

    row = p.row

    def fixed(v: float | None) -> str:
        return "—" if v is None or not math.isfinite(v) else f"{v:.3f}"

    diff = "—"
    if row.diff is not None and not row.is_baseline:
        d = row.diff
        diff = f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
    return [
        "—" if p.goal is None else f"{p.goal:g}",
        _series_label(p),
        row.label,
        fixed(row.planned_keep),
        fixed(row.density),
        f"{row.value:.4g}",
        "—" if row.pct_dense is None else f"{row.pct_dense:.1f}%",
        diff,
        "—" if row.is_baseline else detectable_cell(row.diff),
        row.verdict or "—",
        "—" if row.is_baseline else needed_cell(row.diff),
        str(row.n),
    ]


def _ordered(sweep: Sweep) -> list[SweepPoint]:
    """Dense and a reference outside the goals first, then goal by goal."""
    return [p for p in sweep.points if p.goal is None] + sorted(
        (p for p in sweep.points if p.goal is not None), key=lambda p: p.goal
    )


def sweep_table(sweep: Sweep) -> Table:
    """The sweep's points as one rich table."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(
        title=f"{sweep.name}: quality against kept fraction ({len(sweep.ids)} held-out documents)",
        title_justify="left",
        box=box.SIMPLE_HEAVY,
        pad_edge=False,
    )
    headers = _headers(sweep)
    for h in headers:
        table.add_column(h, justify="left" if h in _LEFT_HEADERS else "right")
    style = {"better": "green", "worse": "red", "baseline": "dim"}
    for p in _ordered(sweep):
        cells = [Text(c) for c in _cells(p)]
        if p.row.verdict in style:
            cells[headers.index("verdict")].stylize(style[p.row.verdict])
        table.add_row(*cells)
    return table


def iso_sentences(sweep: Sweep) -> list[str]:
    """The iso-quality statement of each tuned series, the headline first."""
    return [
        iso_sentence(
            sweep.iso[s], SERIES_LABELS[s][0].upper() + SERIES_LABELS[s][1:], sweep.reference
        )
        for s in TUNED_SERIES
        if s in sweep.iso
    ]


PLOT_NOTE = (
    "Error bars: the 95% paired bootstrap interval of each point's difference from "
    "{ref}, drawn around the point; a bar that crosses the dashed line is not "
    "distinguishable from {ref} on these documents. x is the realized density (what "
    "decode ran), which can fall below CoreInfer's keep. The shaded band is the "
    "bootstrap interval of the iso-quality density of the AVG curve."
)


def to_markdown(sweep: Sweep, plot_name: str = "sweep.png") -> str:
    from autosparse.report import LEGEND

    headers = _headers(sweep)
    out = [f"# {sweep.name}: quality against kept fraction", ""]
    facts = {
        "model": sweep.model,
        "task": sweep.task,
        "metric": sweep.metric,
        "goals": ", ".join(f"{g:g}" for g in sweep.goals),
        "studies": ", ".join(sweep.studies[g] for g in sweep.goals),
        **sweep.meta,
    }
    out += [f"- **{k}**: {v}" for k, v in facts.items() if v not in (None, "")]
    out += ["", "## Iso-quality saving", ""]
    out += [f"- {s}" for s in iso_sentences(sweep)]
    out += [
        "",
        f"The headline is the AVG curve ({SERIES_LABELS[HEADLINE]}), fixed before any "
        "held-out number is seen; the best-trial curve is shown for comparison.",
        "",
        f"![quality against realized density]({plot_name})",
        "",
        PLOT_NOTE.format(ref=sweep.reference),
        "",
        f"## Held-out documents ({len(sweep.ids)})",
        "",
        "| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |",
        "|" + "|".join("---" if h in _LEFT_HEADERS else "---:" for h in headers) + "|",
    ]
    for p in _ordered(sweep):
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(p)) + " |")
    out += ["", LEGEND, ""]
    return "\n".join(out)


def to_json(sweep: Sweep) -> dict[str, Any]:
    """The sweep as a JSON-able dict: one entry in ``points`` per goal and method
    (dense, and a reference outside the goals, with goal null)."""
    return {
        "name": sweep.name,
        "model": sweep.model,
        "task": sweep.task,
        "metric": sweep.metric,
        "goals": sweep.goals,
        "reference": sweep.reference,
        "held_out_ids": sweep.ids,
        "studies": {f"{g:g}": sweep.studies[g] for g in sweep.goals},
        "meta": json.loads(json.dumps(sweep.meta, default=str)),
        "headline": HEADLINE,
        "iso_quality": {s: iso.to_dict() for s, iso in sweep.iso.items()},
        "iso_quality_text": iso_sentences(sweep),
        "points": [p.to_dict() for p in _ordered(sweep)],
    }


def plot(sweep: Sweep, path: str | Path) -> Path:
    """Quality against realized density, both methods, with paired intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = sweep.reference_point
    fig, ax = plt.subplots(figsize=(8, 5))
    try:

        def draw(points, label, **style):
            points = sorted(points, key=lambda p: p.density)
            xs = [p.density for p in points]
            ys = [p.quality for p in points]
            lows, highs = [], []
            for p in points:
                d = p.row.diff
                if d is None or p.row.is_baseline:
                    lows.append(0.0)
                    highs.append(0.0)
                else:
                    lows.append(max(0.0, p.quality - (ref.quality + d.low)))
                    highs.append(max(0.0, ref.quality + d.high - p.quality))
            ax.errorbar(xs, ys, yerr=[lows, highs], label=label, capsize=3, marker="o", **style)
            return points

        uniform = sweep.series(COREINFER)
        name = _series_label(uniform[0]) if uniform else SERIES_LABELS[COREINFER]
        core = draw(uniform, f"{name} (keep = goal)", color="tab:orange")
        for p in core:
            ax.annotate(
                f"keep {p.goal:g}",
                (p.density, p.quality),
                textcoords="offset points",
                xytext=(4, -12),
                fontsize=7,
                color="tab:orange",
            )
        draw(sweep.series(TUNED_AVG), SERIES_LABELS[TUNED_AVG], color="tab:blue")
        draw(
            sweep.series(TUNED_BEST),
            SERIES_LABELS[TUNED_BEST],
            color="tab:blue",
            linestyle=":",
            alpha=0.6,
        )
        if ref.goal is None:
            ax.plot([ref.density], [ref.quality], "s", color="tab:orange")
        dense = sweep.dense_point
        ax.axhline(dense.quality, color="gray", linestyle=":", label=f"dense ({dense.quality:.3g})")
        ax.axhline(
            ref.quality,
            color="tab:orange",
            linestyle="--",
            linewidth=1,
            label=f"{sweep.reference} ({ref.quality:.3g})",
        )
        iso = sweep.iso.get(HEADLINE)
        if iso is not None and iso.status == CROSSED:
            ax.axvline(iso.density, color="tab:blue", linestyle="--", linewidth=1)
            if iso.low is not None:
                high = iso.high if iso.high is not None else ax.get_xlim()[1]
                ax.axvspan(iso.low, high, color="tab:blue", alpha=0.1)
        ax.set_xlabel("realized density (fraction of FFN neurons decode ran)")
        ax.set_ylabel(f"{sweep.metric} (mean per document)")
        # a model's identity can be long (quantization, hash): wrap it within the axes
        title = f"{sweep.model} · {sweep.task} · {len(sweep.ids)} held-out documents"
        ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def write_sweep(sweep: Sweep, directory: str | Path) -> tuple[Path, Path, Path]:
    """Write sweep.md, sweep.json and sweep.png into ``directory``; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    png = plot(sweep, directory / "sweep.png")
    md = directory / "sweep.md"
    md.write_text(to_markdown(sweep, png.name), encoding="utf-8")
    js = directory / "sweep.json"
    js.write_text(
        json.dumps(to_json(sweep), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        encoding="utf-8",
    )
    return md, js, png
