"""Finalize a study: the top trials and their average on held-out data, beside CoreInfer
and dense, as a report that says whether tuned levels beat CoreInfer and how sure we are."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from autosparse.errors import ConfigError
from autosparse.levels import average_levels
from autosparse.methods import Method, uniform_label
from autosparse.tuning import Evaluator, StudySpec, clamp_levels, finished_trials


def held_out_ids(
    all_ids: Sequence[int],
    *,
    calibration: Sequence[int] = (),
    screen: Sequence[int] = (),
    limit: int | None = None,
    seed: int = 42,
) -> list[int]:
    """Documents a finalize evaluates: never calibration documents; with ``limit``, a
    seeded random sample that also avoids the screen (so the screen's winner is judged on
    data it was not picked on); without, the whole set minus calibration."""
    banned = set(calibration)
    pool = [i for i in all_ids if i not in banned]
    if limit is None:
        return pool
    fresh = [i for i in pool if i not in set(screen)]
    if limit > len(fresh):
        raise ConfigError(
            f"--limit {limit} exceeds the {len(fresh)} documents outside the calibration and "
            "screening samples; use a smaller --limit or --full"
        )
    return sorted(random.Random(seed).sample(fresh, limit))


@dataclass(frozen=True)
class Candidate:
    label: str
    method: Method
    params: dict | None
    number: int | None = None  # the trial's number; None for the AVG


def candidates(
    study, spec: StudySpec, *, top_k: int, select: str, mode: str = "masked"
) -> list[Candidate]:
    """The top-k trials with distinct level vectors, and the AVG of their levels. Trials
    whose levels equal a better trial's (the formula gives the same vector for several
    settings, e.g. any top_k at w_sum 0) are skipped: they would repeat its row and weigh
    twice in the AVG."""
    trials = []
    seen = set()
    for t in finished_trials(study, select=select):
        key = tuple(round(float(x), 9) for x in t.user_attrs["levels"])
        if key not in seen:
            seen.add(key)
            trials.append(t)
        if len(trials) == top_k:
            break
    if not trials:
        raise ConfigError(
            f"study {study.study_name!r} has no finished feasible trial yet; run autosparse tune first"
        )
    out = []
    for t in trials:
        params = dict(t.user_attrs.get("params") or t.params)
        method = Method.levels(
            t.user_attrs["levels"],
            spec.token_ratio,
            layers=spec.layers,
            mode=mode,
            selector=spec.selector,
            params=params,
        )
        out.append(Candidate(f"trial #{t.number}", method, params, t.number))
    if len(trials) > 1:
        avg = clamp_levels(average_levels([t.user_attrs["levels"] for t in trials]))
        out.append(
            Candidate(
                f"AVG of top {len(trials)}",
                Method.levels(
                    avg,
                    spec.token_ratio,
                    layers=spec.layers,
                    mode=mode,
                    selector=spec.selector,
                    params={"average_of": [t.number for t in trials]},
                ),
                None,
            )
        )
    return out


def finalize(
    study,
    spec: StudySpec,
    evaluator: Evaluator,
    *,
    top_k: int = 3,
    limit: int | None = None,
    select: str = "mean",
    mode: str = "masked",
    on_status: Callable[[str], None] | None = None,
    objective_evaluator: Evaluator | None = None,
):
    """Evaluate the candidates, CoreInfer and dense on the held-out documents; return a
    report.Report with a held-out section and the screen section for comparison.

    The report's meta also gives the winner's (the first candidate's) screen-to-held-out
    gap in the study's objective: its screen value beside its held-out value, measured by
    ``objective_evaluator`` when the objective is not the task metric (without one, the
    gap of such a study is not measured)."""
    from autosparse.report import Report, ReportSection, make_row

    say = on_status or (lambda _: None)
    if top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    chosen = candidates(study, spec, top_k=top_k, select=select, mode=mode)
    attrs = study.user_attrs
    ids = held_out_ids(
        evaluator.document_ids(),
        calibration=attrs.get("calibration_ids", ()),
        screen=attrs.get("screen_ids", ()),
        limit=limit,
        seed=spec.seed,
    )
    if not ids:
        raise ConfigError("no held-out documents left to evaluate")
    core_method = Method.coreinfer(
        spec.baseline_keep, spec.token_ratio, layers=spec.layers, mode=mode, selector=spec.selector
    )
    baseline_label = uniform_label(spec.baseline_keep, spec.selector)
    say(f"{baseline_label} on {len(ids)} documents")
    core = evaluator.run(core_method, ids)
    say(f"dense on {len(ids)} documents")
    dense = evaluator.run(Method.dense(), ids)
    rows = _baseline_rows(spec, core, dense)
    held_out = {}
    for c in chosen:
        say(f"{c.label} on {len(ids)} documents")
        result = evaluator.run(c.method, ids)
        held_out[c.label] = result
        rows.append(
            make_row(c.label, result, coreinfer=core, dense=dense, params=c.params, seed=spec.seed)
        )
    winner = chosen[0]
    if spec.objective == "task":
        winner_held_out, core_held_out = held_out[winner.label], core
    elif objective_evaluator is not None:
        say(
            f"{winner.label} and {baseline_label} on {len(ids)} documents, objective {spec.objective}"
        )
        winner_held_out = objective_evaluator.run(winner.method, ids)
        core_held_out = objective_evaluator.run(core_method, ids)
    else:
        winner_held_out = core_held_out = None
    gap = winner_gap(study, spec, winner, winner_held_out, core_held_out)

    scope = "full dataset" if limit is None else f"held-out sample of {len(ids)}"
    sections = [ReportSection(f"{scope.capitalize()} ({len(ids)} documents)", rows)]
    screen = _screen_section(study, spec, chosen)
    if screen is not None:
        sections.append(screen)
    goal = attrs.get("goal")
    return Report(
        title=f"{study.study_name}: tuned levels vs CoreInfer",
        model=spec.model_id,
        task=spec.task,
        metric=evaluator.metric,
        sections=sections,
        meta={
            "study": study.study_name,
            "goal (mean keep)": goal,
            "baseline": baseline_text(spec),
            "selection": "raw screen mean"
            if select == "mean"
            else "lower confidence bound vs CoreInfer",
            "evaluated": scope,
            "calibration documents excluded": len(attrs.get("calibration_ids", ())),
            "seed": spec.seed,
            "layers": spec.layers or "default",
            "space": spec.space,
            **_gen_cap(evaluator),
            **gap,
        },
        notes=[
            "Candidates were picked on the screen; the held-out table is the honest comparison "
            "(the screen values of the same settings are shown below it)."
        ],
    )


GAP_KEY = "screen-to-held-out gap"
# the gain keys below keep CoreInfer's name for every selector; this one names the baseline
GAIN_BASELINE = "winner gain baseline"


def _gen_cap(evaluator) -> dict[str, int]:
    """The cap on generated tokens, when the evaluation had one (generation tasks)."""
    cap = getattr(getattr(evaluator, "options", None), "max_gen_toks", None)
    return {} if cap is None else {"max new tokens": cap}


def winner_gap(
    study, spec: StudySpec, winner: Candidate, held_out, core_held_out=None
) -> dict[str, object]:
    """Report facts on how much the winner's screen value overstates it: its mean on the
    screen and on the held-out documents in the study's objective, and their difference
    (held-out minus screen). The documents' own difficulty moves that difference too, so
    the winner's gain over CoreInfer on both (paired, same documents) is given beside it:
    a gain that shrinks held out is what fitting the screen looks like."""
    t = study.trials[winner.number]
    unit = "task metric" if spec.objective == "task" else f"objective {spec.objective}"
    facts: dict[str, object] = {
        "winner": f"{winner.label} ({unit})",
        "winner on the screen": _rounded(t.value),
    }
    if held_out is None:
        facts[GAP_KEY] = f"not measured: no {spec.objective} evaluator on the held-out documents"
        return facts
    facts["winner held out"] = _rounded(held_out.score)
    facts[GAP_KEY] = _rounded(held_out.score - t.value)
    screen_gain = (t.user_attrs.get("vs_coreinfer") or {}).get("mean")
    if screen_gain is not None and core_held_out is not None:
        facts[GAIN_BASELINE] = uniform_label(spec.baseline_keep, spec.selector)
        facts["winner gain over CoreInfer on the screen"] = _rounded(screen_gain)
        facts["winner gain over CoreInfer held out"] = _rounded(
            held_out.score - core_held_out.score
        )
        from autosparse.stats import paired_difference

        d = paired_difference(
            held_out.sample_ids,
            held_out.sample_scores,
            core_held_out.sample_ids,
            core_held_out.sample_scores,
            seed=spec.seed,
        )
        facts[HELD_GAIN_INTERVAL] = [_rounded(d.low), _rounded(d.high)]
    return facts


# the paired 95% bootstrap interval of the winner's held-out gain over CoreInfer (or over
# GRIFFIN uniform in a griffin study: GAIN_BASELINE names it)
HELD_GAIN_INTERVAL = "winner gain over CoreInfer held out, 95% interval"


def _rounded(x: float) -> float:
    return float(f"{float(x):.6g}")


def _screen_section(study, spec: StudySpec, chosen: Sequence[Candidate]):
    """The screen's numbers for the same candidates, from what the study stored."""
    from autosparse.report import ReportSection, make_row
    from autosparse.results import EvalResult

    attrs = study.user_attrs
    if "baseline:coreinfer" not in attrs or "baseline:dense" not in attrs:
        return None

    def as_result(d) -> EvalResult:
        return EvalResult(
            model=spec.model_id,
            task=spec.task,
            method=d["method"],
            metric="",
            score=d["score"],
            sample_ids=d["sample_ids"],
            sample_scores=d["sample_scores"],
            density=d["density"],
        )

    core, dense = as_result(attrs["baseline:coreinfer"]), as_result(attrs["baseline:dense"])
    rows = _baseline_rows(spec, core, dense)
    by_number = {f"trial #{t.number}": t for t in study.get_trials(deepcopy=False)}
    for c in chosen:
        t = by_number.get(c.label)
        if t is None:
            continue
        result = EvalResult(
            model=spec.model_id,
            task=spec.task,
            method=c.method.to_dict(),
            metric="",
            score=t.value,
            sample_ids=t.user_attrs["sample_ids"],
            sample_scores=t.user_attrs["sample_scores"],
            density=t.user_attrs.get("density"),
        )
        rows.append(
            make_row(c.label, result, coreinfer=core, dense=dense, params=c.params, seed=spec.seed)
        )
    return ReportSection(
        f"Screen ({len(attrs.get('screen_ids', []))} documents, {_objective_label(spec)})",
        rows,
        metric=_objective_metric(spec),
    )


def baseline_text(spec: StudySpec) -> str:
    """The baseline a study's reports compare with: one keep ratio for every sparse layer,
    chosen by the study's selector."""
    if spec.selector == "griffin":
        return (
            f"GRIFFIN keep {spec.baseline_keep:g} (the paired columns compare with it; "
            "every method of this study selects with GRIFFIN)"
        )
    return f"CoreInfer keep {spec.baseline_keep:g}, token ratio {spec.token_ratio:g}"


def _objective_metric(spec: StudySpec) -> str:
    """The name of a study's objective values when they are not the task metric."""
    if spec.objective == "task":
        return ""
    from autosparse.fidelity.evaluator import METRICS

    return METRICS.get(spec.objective, spec.objective)


def _objective_label(spec: StudySpec) -> str:
    if spec.objective == "task":
        return "per-sample means of the task metric"
    return f"objective {spec.objective}, not the task metric"


def _baseline_rows(spec: StudySpec, core, dense) -> list:
    """The CoreInfer and dense rows every section starts with."""
    from autosparse.report import make_row

    label = uniform_label(spec.baseline_keep, spec.selector)
    return [
        make_row(label, core, coreinfer=core, dense=dense, seed=spec.seed),
        make_row("dense", dense, coreinfer=core, dense=dense, seed=spec.seed),
    ]
