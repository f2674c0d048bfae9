"""The application layer: tune, finalize, list and summarize studies on real models and
tasks, wiring the study logic (autosparse.tuning, autosparse.finalize) to model loading,
the evaluators (autosparse.tasks.evaluator) with their result cache, and calibration
statistics. The CLI calls these functions and renders what they return."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from autosparse.errors import ConfigError, StorageError
from autosparse.methods import uniform_label
from autosparse.storage import sqlite_file
from autosparse.tuning import (
    HEARTBEAT,
    SPEC_ATTR,
    StudySpec,
    Tuner,
    check_spec,
    create_or_resume,
    default_storage,
    default_study_name,
    load_existing,
    open_storage,
    reference_grid,
)

if TYPE_CHECKING:
    from autosparse.report import StudySummary
    from autosparse.tuning import TrialReport

#: receives one-line status messages (loading, calibration, baselines)
StatusCallback = Callable[[str], None]
#: receives each finished trial and the name of the metric its value is in
TrialCallback = Callable[["TrialReport", str], None]

STUDIES_DIR = Path("studies")

# ---------------------------------------------------------------- tune


@dataclass
class TuneOutcome:
    study_name: str
    storage: str
    ran: int
    summary: str
    # the cap on new tokens the study's trials run with (None: the task's default)
    max_gen_toks: int | None = None


def _study_storage(name: str, storage: str | None) -> str:
    return storage or default_storage(name, STUDIES_DIR)


# the study attribute that remembers tune's --max-gen-toks
GEN_CAP_ATTR = "max_gen_toks"


def study_gen_cap(study, max_gen_toks: int | None) -> int | None:
    """The generation cap of a study's evaluations: the one its trials ran with (recorded
    when it was tuned with --max-gen-toks), unless the caller gives one. A resumed study
    refuses a different cap, since its screen scores would mix two lengths."""
    stored = study.user_attrs.get(GEN_CAP_ATTR)
    if max_gen_toks is None:
        return stored
    if stored is not None and stored != max_gen_toks:
        raise ConfigError(
            f"study {study.study_name!r} was tuned with --max-gen-toks {stored}; "
            f"resume it with the same cap (or none)"
        )
    return max_gen_toks


def run_tune(
    spec: StudySpec,
    *,
    study_name: str | None = None,
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
    on_status: StatusCallback | None = None,
    on_trial: TrialCallback | None = None,
    progress: bool = False,
    heartbeat: int = HEARTBEAT,
    loaded=None,
) -> TuneOutcome:
    """Create or resume the study and run trials. Everything that can be checked without
    running a model (storage, task, the study's spec) is checked before anything is written.
    ``on_status`` receives status lines, ``on_trial`` every trial this worker finished;
    ``progress`` draws progress bars on stderr. ``loaded``: the model already loaded
    (``models.load_model``), e.g. by a sweep that tunes several studies; by default it is
    loaded here."""
    from autosparse.calibration import CalibrationChoice, calibration_stats, choose_calibration
    from autosparse.evaluate import make_evaluator
    from autosparse.levels import LevelsIndex
    from autosparse.store import ResultStore
    from autosparse.tasks.registry import canonical_name, load_task

    say = on_status or _ignore
    if enqueue_reference and spec.space != "formula":
        raise ConfigError("--enqueue-reference enqueues formula settings; it needs --space formula")
    name = study_name or default_study_name(
        spec.model,
        spec.task,
        spec.goal,
        spec.goal_from_baseline,
        selector=spec.selector,
        space=spec.space,
    )
    url = _study_storage(name, storage)
    _, task_obj = load_task(canonical_name(spec.task))  # an unknown task fails before any write
    # A new SQLite file is only created once every check has passed.
    new_file = sqlite_file(url)
    optuna_storage = None
    if new_file is None or new_file.exists():
        optuna_storage = open_storage(url, heartbeat=heartbeat)
        existing = load_existing(optuna_storage, name)
        if existing is not None:
            check_spec(existing, spec)
            max_gen_toks = study_gen_cap(existing, max_gen_toks)
    if loaded is None:
        say(f"loading {spec.model}")
        loaded = load_quietly(spec.model, device, dtype)
    from autosparse.adapters import adapter_for
    from autosparse.engine.config import resolve_layers

    adapter = adapter_for(loaded.model)
    layers = resolve_layers(spec.layers, adapter.num_layers(loaded.model))
    if spec.space == "free" and spec.goal is not None:  # a grid that cannot reach the goal
        spec.keep_grid().budget(len(layers), spec.goal)

    prompts = choose_calibration(
        CalibrationChoice(
            task=spec.task, n=spec.calibration, seed=spec.seed + 1, reference=reference_calibration
        )
    )
    source = prompts.source
    stats, reused = calibration_stats(
        prompts,
        model_id=spec.model_id,
        load_model=lambda: (loaded.model, loaded.tokenizer),
        dtype=str(loaded.dtype),
        directory=STUDIES_DIR / "calibration",
        progress=progress,
    )
    kept_out = "; excluded from evaluation" if prompts.exclude_from_evaluation else ""
    say(("reused" if reused else "computed") + f" calibration statistics ({source}{kept_out})")
    index = LevelsIndex.from_stats(stats, layers)

    all_ids = list(range(len(task_obj.eval_docs)))
    calibration_ids = prompts.ids if prompts.exclude_from_evaluation else []
    pool = [i for i in all_ids if i not in set(calibration_ids)]
    if spec.screen > len(pool):
        raise ConfigError(
            f"--screen {spec.screen} exceeds the {len(pool)} documents left after calibration"
        )
    screen = sorted(random.Random(spec.seed).sample(pool, spec.screen))

    if optuna_storage is None:
        optuna_storage = open_storage(url, heartbeat=heartbeat)
    study = create_or_resume(optuna_storage, name, spec, layers=index.layers)
    store = ResultStore(url)
    options = study_options(
        spec,
        batch_size=batch_size,
        max_gen_toks=max_gen_toks,
        store=store,
        progress=progress,
        prompt_cache_gb=prompt_cache_gb,
    )
    evaluator = make_evaluator(spec.objective, loaded, options)
    if max_gen_toks is not None and GEN_CAP_ATTR not in study.user_attrs:
        study.set_user_attr(GEN_CAP_ATTR, max_gen_toks)
    if "calibration_ids" not in study.user_attrs:
        study.set_user_attr("calibration_ids", calibration_ids)
        study.set_user_attr("calibration_source", source)
        study.set_user_attr("model", spec.model)
    tuner = Tuner(study, spec, evaluator, index, method_defaults={"mode": mode})
    tuner.prepare(screen, on_status=say)
    core, dense = tuner.baseline("coreinfer"), tuner.baseline("dense")
    say(
        f"screen: dense {evaluator.metric} {dense.score:.4g}, "
        f"{uniform_label(spec.baseline_keep, spec.selector)} {core.score:.4g} (realized density {_fmt(core.density)}); goal mean keep {tuner.goal:.4g}"
    )
    if enqueue_reference and not study.trials:
        relu = adapter.kind == "relu"
        hits = reference_grid(tuner.goal, index, relu=relu, tolerance=spec.tolerance)
        for p in hits:
            params = {"w_sum": p["w_sum"], "top_k": p["top_k"]}
            if spec.strategy == "constrained":
                params["threshold"] = p["threshold"]
            if p["top_k"] in spec.top_k_choices:
                study.enqueue_trial(params, skip_if_exists=True)
        say(f"enqueued {len(hits)} reference grid points")
    metric = evaluator.metric
    ran = tuner.run(
        trials,
        timeout,
        on_trial=None if on_trial is None else lambda r: on_trial(r, metric),
        on_status=say,
    )
    best = tuner.trial_report(study.trials[-1]) if study.trials else None
    summary = (
        f"study {name!r}: {len(study.trials)} trials in {url}"
        + (
            f"; best {best.best:.4g} (trial #{best.best_number})"
            if best and best.best is not None
            else ""
        )
        + f"\nnext: autosparse finalize --study {name}"
        + ("" if storage is None else f" --storage '{storage}'")
        + f"\ndashboard: optuna-dashboard {url}"
    )
    store.close()
    return TuneOutcome(name, url, ran, summary, max_gen_toks)


def study_options(
    spec: StudySpec,
    *,
    batch_size: int,
    max_gen_toks: int | None,
    store,
    progress: bool,
    prompt_cache_gb: float = 4.0,
):
    """The evaluator options of a study's evaluations (its model, task, shots, metric, seed)
    with the run's own batch size, token cap, store and progress bars."""
    from autosparse.tasks.evaluator import EvaluatorOptions

    return EvaluatorOptions(
        model_id=spec.model_id,
        task=spec.task,
        num_fewshot=spec.num_fewshot,
        batch_size=batch_size,
        metric=spec.metric,
        seed=spec.seed,
        max_gen_toks=max_gen_toks,
        store=store,
        progress=progress,
        prompt_cache_gb=prompt_cache_gb,
    )


def load_quietly(model: str, device: str, dtype: str):
    """``models.load_model`` without transformers' progress bars (callers print status lines)."""
    from transformers.utils import logging as hf_logging

    from autosparse.models import load_model

    hf_logging.disable_progress_bar()  # the workflow prints its own status lines
    return load_model(model, device=device, dtype=dtype)


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def _ignore(_: str) -> None:
    pass


# ---------------------------------------------------------------- finalize


def run_finalize(
    study_name: str,
    *,
    storage: str | None = None,
    top_k: int = 3,
    limit: int | None = None,
    select: str = "mean",
    device: str = "auto",
    dtype: str = "auto",
    mode: str = "masked",
    batch_size: int = 8,
    max_gen_toks: int | None = None,
    on_status: StatusCallback | None = None,
    progress: bool = False,
):
    """Finalize a study; returns (report, (report.md, report.json)). ``on_status``
    receives status lines; ``progress`` draws progress bars on stderr."""
    from autosparse.evaluate import make_evaluator
    from autosparse.finalize import finalize
    from autosparse.report import write_report
    from autosparse.store import ResultStore
    from autosparse.tasks.evaluator import TaskEvaluator

    url = _study_storage(study_name, storage)
    if storage is None and not (STUDIES_DIR / f"{study_name}.db").exists():
        raise StorageError(
            f"no study {study_name!r}: {STUDIES_DIR / (study_name + '.db')} does not exist"
        )
    study = load_existing(open_storage(url), study_name)
    if study is None or SPEC_ATTR not in study.user_attrs:
        raise StorageError(f"no autosparse study {study_name!r} in {url}")
    spec = StudySpec.from_dict(study.user_attrs[SPEC_ATTR])
    # held-out documents generate as many tokens as the screen did, unless told otherwise
    if max_gen_toks is None:
        max_gen_toks = study.user_attrs.get(GEN_CAP_ATTR)
    say = on_status or _ignore
    say(f"loading {spec.model}")
    loaded = load_quietly(spec.model, device, dtype)
    from autosparse.models import model_identity

    if model_identity(spec.model) != spec.model_id:
        raise StorageError(
            f"study {study_name!r} was tuned on {spec.model_id}, but {spec.model} now resolves to "
            f"{model_identity(spec.model)}"
        )
    with ResultStore(url) as store:
        options = study_options(
            spec, batch_size=batch_size, max_gen_toks=max_gen_toks, store=store, progress=progress
        )
        evaluator = TaskEvaluator(loaded, options)
        # the winner's screen-to-held-out gap is measured in the objective it was picked on
        objective = (
            None if spec.objective == "task" else make_evaluator(spec.objective, loaded, options)
        )
        report = finalize(
            study,
            spec,
            evaluator,
            top_k=top_k,
            limit=limit,
            select=select,
            mode=mode,
            on_status=say,
            objective_evaluator=objective,
        )
    paths = write_report(report, STUDIES_DIR / study_name)
    png = plot_candidates(study, spec, STUDIES_DIR / study_name / "levels.png", top_k, select)
    return report, (*paths, png)


def plot_candidates(study, spec: StudySpec, path: Path, top_k: int, select: str) -> Path:
    """Draw the level vectors finalize evaluated (its top-k trials and their AVG) beside
    the uniform keep of the baseline."""
    from autosparse.finalize import candidates
    from autosparse.levels_workflow import plot_level_vectors

    chosen = candidates(study, spec, top_k=top_k, select=select)
    return plot_level_vectors(
        path,
        {c.label: list(c.method.keep) for c in chosen},
        uniform=spec.baseline_keep,
        uniform_label=uniform_label(spec.baseline_keep, spec.selector),
        title=f"{study.study_name}: per-layer keep ratios ({spec.space} space)",
    )


# ---------------------------------------------------------------- listing


def list_studies(storage: str | None = None) -> list[tuple]:
    """(name, model, task, goal, trials, best value, best trial, storage) per study."""
    import optuna

    from autosparse.tuning import best_trial

    urls = (
        [storage]
        if storage
        else [default_storage(p.stem, STUDIES_DIR) for p in sorted(STUDIES_DIR.glob("*.db"))]
    )
    rows = []
    for url in urls:
        try:
            opened = open_storage(url, heartbeat=None)
            summaries = optuna.get_all_study_names(storage=opened)
        except StorageError:
            raise
        except Exception:  # noqa: BLE001 - a database without Optuna tables
            continue
        for name in summaries:
            study = optuna.load_study(study_name=name, storage=opened)
            spec = study.user_attrs.get(SPEC_ATTR, {})
            best = best_trial(study)
            rows.append(
                (
                    name,
                    spec.get("model", "?"),
                    spec.get("task", "?"),
                    study.user_attrs.get("goal", spec.get("goal")),
                    len(study.trials),
                    None if best is None else f"{best.value:.4g}",
                    None if best is None else best.number,
                    url,
                )
            )
    return rows


def study_summary(name: str, storage: str | None = None) -> StudySummary:
    """A study's spec, baselines and trials (``report.study_tables`` renders it)."""
    from autosparse.report import StudySummary, TrialRow

    url = _study_storage(name, storage)
    if storage is None and not (STUDIES_DIR / f"{name}.db").exists():
        raise StorageError(f"no study {name!r}: {STUDIES_DIR / (name + '.db')} does not exist")
    study = load_existing(open_storage(url, heartbeat=None), name)
    if study is None:
        raise StorageError(f"no study {name!r} in {url}")
    spec = study.user_attrs.get(SPEC_ATTR, {})
    attrs = study.user_attrs
    trials = []
    for t in study.trials:
        u = t.user_attrs
        trials.append(
            TrialRow(
                number=t.number,
                state=t.state.name.lower(),
                feasible=u.get("feasible", True),
                params=dict(u.get("params", {})),
                achieved=u.get("achieved_mean"),
                density=u.get("density"),
                value=t.value,
                vs_coreinfer=u.get("vs_coreinfer"),
                samples=len(u.get("sample_ids", [])),
                seconds=u.get("seconds"),
            )
        )
    return StudySummary(
        name=name,
        model_id=spec.get("model_id"),
        task=spec.get("task"),
        goal=attrs.get("goal"),
        strategy=spec.get("strategy"),
        space=spec.get("space", "formula"),
        screen=len(attrs.get("screen_ids", [])),
        calibration=attrs.get("calibration_source"),
        baselines={
            label: attrs[f"baseline:{label}"]
            for label in ("coreinfer", "dense")
            if attrs.get(f"baseline:{label}")
        },
        trials=trials,
        selector=spec.get("selector", "coreinfer"),
    )
