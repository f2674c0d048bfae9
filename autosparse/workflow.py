"""The tune / finalize workflow on real models and tasks: wiring the study logic
(autosparse.tuning, autosparse.finalize) to model loading, lm-eval evaluation with a
result cache, and calibration statistics. The CLI calls these functions."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autosparse.errors import ConfigError, StorageError
from autosparse.methods import Method
from autosparse.results import EvalResult
from autosparse.tuning import (
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

STUDIES_DIR = Path("studies")
#: the study `autosparse tune` with no options creates, and `finalize` with no --study reads
DEFAULT_STUDY = "smollm2-135m-csqa-local-g0.4"


# ----------------------------------------------------------------- evaluation


class TaskEvaluator:
    """Evaluates methods on documents of one task with one loaded model, through lm-eval.
    Every evaluation is cached in a ResultStore (the study's database by default), so a
    resumed study or a second worker never recomputes a baseline. After ``prepare(ids)``
    (the tuning screen) documents among ``ids`` are answered from requests built once
    (``PreparedTask``), each with the prompt it has in the whole screen."""

    def __init__(
        self,
        loaded,
        task: str,
        *,
        model_id: str,
        num_fewshot: int | None = None,
        batch_size: int = 8,
        metric: str | None = None,
        max_gen_toks: int | None = None,
        seed: int = 42,
        store=None,
        progress: bool = True,
    ):
        from autosparse.tasks.registry import canonical_name, primary_metric

        self.loaded = loaded
        self.task = canonical_name(task)
        self.model_id = model_id
        self.num_fewshot = num_fewshot
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.seed = seed
        self.store = store
        self.progress = progress
        self.metric = primary_metric(self.task, metric) or metric or "score"
        self._requested_metric = metric
        self._n_docs: int | None = None
        self._prepared = None

    def prepare(self, ids: Sequence[int]) -> None:
        """Build the requests of documents ``ids`` once for every later ``run`` on them."""
        from autosparse.tasks.prepared import PreparedTask

        self._prepared = PreparedTask(self.loaded.model, self.task, ids, **self._options())

    def _options(self) -> dict[str, Any]:
        """The evaluation options of run_task and PreparedTask."""
        return {
            "tokenizer": self.loaded.tokenizer,
            "seed": self.seed,
            "num_fewshot": self.num_fewshot,
            "batch_size": self.batch_size,
            "metric": self._requested_metric,
            "model_name": self.model_id,
            "max_gen_toks": self.max_gen_toks,
        }

    def document_ids(self) -> list[int]:
        if self._n_docs is None:
            from autosparse.tasks.registry import load_task

            _, task_obj = load_task(self.task)
            self._n_docs = len(task_obj.eval_docs)
        return list(range(self._n_docs))

    def _settings(
        self, ids: Sequence[int], prompts_of: Sequence[int] | None = None
    ) -> dict[str, Any]:
        settings = {
            "ids": [int(i) for i in ids],
            "seed": self.seed,
            "num_fewshot": self.num_fewshot,
            "batch_size": self.batch_size,
            "metric": self._requested_metric,
            "max_gen_toks": self.max_gen_toks,
            "dtype": str(self.loaded.dtype).replace("torch.", ""),
        }
        if prompts_of is not None and sorted(prompts_of) != sorted(int(i) for i in ids):
            # with few-shot examples, a document's prompt depends on the documents it
            # was built with: part of a prepared screen is not the same evaluation
            settings["prompts_of"] = sorted(int(i) for i in prompts_of)
        return settings

    def run(self, method: Method, ids: Sequence[int]) -> EvalResult:
        from autosparse.tasks.evaluation import run_task

        prepared = self._prepared
        if prepared is not None and not set(int(i) for i in ids) <= set(prepared.ids):
            prepared = None
        settings = self._settings(ids, prepared.ids if prepared is not None else None)
        if self.store is not None:
            hit = self.store.find(self.model_id, self.task, method, settings)
            if hit is not None:
                return hit.result()
        if prepared is not None:
            result = prepared.run(method, ids, progress=self.progress).result
        else:
            result = run_task(
                self.loaded.model,
                self.task,
                method,
                ids=list(ids),
                progress=self.progress,
                **self._options(),
            ).result
        result.settings = settings
        if self.store is not None:
            self.store.save(result)
        return result


# ---------------------------------------------------------------- calibration


def calibration_samples(
    task: str, n: int, *, seed: int, reference: bool
) -> tuple[list[tuple[int, str]], str, bool]:
    """(doc id, prompt) pairs for calibration, a description of the source, and whether
    they must be kept out of evaluation. By default a seeded random draw that the study
    then excludes from its screen and from finalize; ``reference`` reproduces the seed's
    choice (the first ``n`` documents with the gold answer appended, overlapping
    evaluation)."""
    from autosparse.tasks.registry import load_task
    from autosparse.tasks.sampling import calibration_texts, prompt_text

    if reference:
        _, task_obj = load_task(task)
        docs = task_obj.eval_docs
        samples = [(i, prompt_text(task_obj, docs[i], True)) for i in range(min(n, len(docs)))]
        return samples, f"{task}: first {len(samples)} documents + gold answers (reference)", False
    samples = calibration_texts(task, n, seed=seed + 1)
    return (
        samples,
        f"{task}: {len(samples)} random documents (seed {seed + 1}), excluded from evaluation",
        True,
    )


# ---------------------------------------------------------------- tune


@dataclass
class TuneOutcome:
    study_name: str
    storage: str
    ran: int
    summary: str


def _study_storage(name: str, storage: str | None) -> str:
    return storage or default_storage(name, STUDIES_DIR)


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
    console=None,
    loaded=None,
) -> TuneOutcome:
    """Create or resume the study and run trials. Everything that can be checked without
    running a model (storage, task, the study's spec) is checked before anything is written.
    ``loaded``: the model already loaded (``models.load_model``), e.g. by a sweep that tunes
    several studies; by default it is loaded here."""
    from autosparse.calibration import load_or_collect
    from autosparse.levels import LevelsIndex
    from autosparse.store import ResultStore
    from autosparse.tasks.registry import canonical_name, load_task

    say = _say(console)
    name = study_name or default_study_name(
        spec.model, spec.task, spec.goal, spec.goal_from_baseline
    )
    url = _study_storage(name, storage)
    _, task_obj = load_task(canonical_name(spec.task))  # an unknown task fails before any write
    # A new SQLite file is only created once every check has passed.
    new_file = _sqlite_file(url)
    optuna_storage = None
    if new_file is None or new_file.exists():
        optuna_storage = open_storage(url)
        existing = load_existing(optuna_storage, name)
        if existing is not None:
            check_spec(existing, spec)
    if loaded is None:
        say(f"loading {spec.model}")
        loaded = _load_quietly(spec.model, device, dtype)
    from autosparse.adapters import adapter_for
    from autosparse.engine.config import resolve_layers

    adapter = adapter_for(loaded.model)
    layers = resolve_layers(spec.layers, adapter.num_layers(loaded.model))

    samples, source, exclude = calibration_samples(
        spec.task, spec.calibration, seed=spec.seed, reference=reference_calibration
    )
    stats, reused = load_or_collect(
        STUDIES_DIR / "calibration",
        model_id=spec.model_id,
        source=source,
        samples=samples,
        load_model=lambda: (loaded.model, loaded.tokenizer),
        layers=layers,
        dtype=str(loaded.dtype).replace("torch.", ""),
        progress=console is not None,
    )
    say(("reused" if reused else "computed") + f" calibration statistics ({source})")
    index = LevelsIndex(stats.S, stats.c, stats.layers)

    all_ids = list(range(len(task_obj.eval_docs)))
    calibration_ids = [i for i, _ in samples] if exclude else []
    pool = [i for i in all_ids if i not in set(calibration_ids)]
    if spec.screen > len(pool):
        raise ConfigError(
            f"--screen {spec.screen} exceeds the {len(pool)} documents left after calibration"
        )
    screen = sorted(random.Random(spec.seed).sample(pool, spec.screen))

    if optuna_storage is None:
        optuna_storage = open_storage(url)
    study = create_or_resume(optuna_storage, name, spec)
    store = ResultStore(url)
    extra: dict[str, Any] = {}
    if spec.objective == "task":
        evaluator_class, metric = TaskEvaluator, spec.metric
    else:
        from autosparse.fidelity import FidelityEvaluator

        evaluator_class, metric = FidelityEvaluator, spec.objective
        extra["prompt_cache_gb"] = prompt_cache_gb
    evaluator = evaluator_class(
        loaded,
        spec.task,
        model_id=spec.model_id,
        num_fewshot=spec.num_fewshot,
        batch_size=batch_size,
        metric=metric,
        max_gen_toks=max_gen_toks if spec.objective == "task" else None,
        seed=spec.seed,
        store=store,
        progress=console is not None,
        **extra,
    )
    if "calibration_ids" not in study.user_attrs:
        study.set_user_attr("calibration_ids", calibration_ids)
        study.set_user_attr("calibration_source", source)
        study.set_user_attr("model", spec.model)
    tuner = Tuner(study, spec, evaluator, index, method_defaults={"mode": mode})
    tuner.prepare(screen, on_status=say)
    core, dense = tuner.baseline("coreinfer"), tuner.baseline("dense")
    say(
        f"screen: dense {evaluator.metric} {dense.score:.4g}, CoreInfer keep {spec.baseline_keep:g} "
        f"{core.score:.4g} (realized density {_fmt(core.density)}); goal mean keep {tuner.goal:.4g}"
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
    ran = tuner.run(trials, timeout, on_trial=_trial_printer(console, evaluator.metric))
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
    return TuneOutcome(name, url, ran, summary)


def _load_quietly(model: str, device: str, dtype: str):
    from transformers.utils import logging as hf_logging

    from autosparse.models import load_model

    hf_logging.disable_progress_bar()  # the workflow prints its own status lines
    return load_model(model, device=device, dtype=dtype)


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (None for other databases or in-memory)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - open_storage reports bad URLs
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def _say(console):
    if console is None:
        return lambda _: None
    return lambda msg: console.print(f"[dim]{msg}[/dim]")


def _trial_printer(console, metric: str):
    if console is None:
        return None

    def show(r) -> None:
        p = r.params or {}
        gain = ""
        if r.vs_baseline:
            v = r.vs_baseline
            gain = f"  vs CoreInfer {v['mean']:+.3g} [{v['low']:+.3g}, {v['high']:+.3g}]"
        value = "-" if r.value is None else f"{r.value:.4g}"
        best = "-" if r.best is None else f"{r.best:.4g} (#{r.best_number})"
        console.print(
            f"trial {r.number:>3} {r.state.lower():>8}  w_sum={p.get('w_sum', 0):.2f} "
            f"top_k={p.get('top_k', '-')} threshold={p.get('threshold', float('nan')):.3f}  "
            f"kept {_fmt(r.achieved)} realized {_fmt(r.density)}  {metric} {value}{gain}  best {best}"
        )

    return show


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
    console=None,
):
    """Finalize a study; returns (report, (report.md, report.json))."""
    from autosparse.finalize import finalize
    from autosparse.report import write_report
    from autosparse.store import ResultStore

    url = _study_storage(study_name, storage)
    if storage is None and not (STUDIES_DIR / f"{study_name}.db").exists():
        raise StorageError(
            f"no study {study_name!r}: {STUDIES_DIR / (study_name + '.db')} does not exist"
        )
    study = load_existing(open_storage(url), study_name)
    if study is None or SPEC_ATTR not in study.user_attrs:
        raise StorageError(f"no autosparse study {study_name!r} in {url}")
    spec = StudySpec.from_dict(study.user_attrs[SPEC_ATTR])
    say = _say(console)
    say(f"loading {spec.model}")
    loaded = _load_quietly(spec.model, device, dtype)
    from autosparse.models import model_identity

    if model_identity(spec.model) != spec.model_id:
        raise StorageError(
            f"study {study_name!r} was tuned on {spec.model_id}, but {spec.model} now resolves to "
            f"{model_identity(spec.model)}"
        )
    with ResultStore(url) as store:
        evaluator = TaskEvaluator(
            loaded,
            spec.task,
            model_id=spec.model_id,
            num_fewshot=spec.num_fewshot,
            batch_size=batch_size,
            metric=spec.metric,
            max_gen_toks=max_gen_toks,
            seed=spec.seed,
            store=store,
            progress=console is not None,
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
        )
    paths = write_report(report, STUDIES_DIR / study_name)
    return report, paths


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
            summaries = optuna.get_all_study_names(storage=open_storage(url, heartbeat=None))
        except StorageError:
            raise
        except Exception:  # noqa: BLE001 - a database without Optuna tables
            continue
        for name in summaries:
            study = optuna.load_study(study_name=name, storage=url)
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


def show(name: str, storage: str | None = None) -> list:
    """Renderables describing a study's trials."""
    from rich.table import Table

    url = _study_storage(name, storage)
    if storage is None and not (STUDIES_DIR / f"{name}.db").exists():
        raise StorageError(f"no study {name!r}: {STUDIES_DIR / (name + '.db')} does not exist")
    study = load_existing(open_storage(url, heartbeat=None), name)
    if study is None:
        raise StorageError(f"no study {name!r} in {url}")
    spec = study.user_attrs.get(SPEC_ATTR, {})
    attrs = study.user_attrs
    header = Table.grid(padding=(0, 2))
    for k, v in (
        ("model", spec.get("model_id")),
        ("task", spec.get("task")),
        ("goal (mean keep)", attrs.get("goal")),
        ("strategy", spec.get("strategy")),
        ("screen", len(attrs.get("screen_ids", []))),
        ("calibration", attrs.get("calibration_source")),
    ):
        header.add_row(f"[bold]{k}", str(v))
    for label in ("coreinfer", "dense"):
        b = attrs.get(f"baseline:{label}")
        if b:
            header.add_row(
                f"[bold]{label} on screen",
                f"{b['score']:.4g} (realized density {_fmt(b['density'])})",
            )
    table = Table(title=f"Trials of {name}")
    for col in (
        "#",
        "state",
        "w_sum",
        "w_count",
        "threshold",
        "top_k",
        "kept (mean level)",
        "realized density",
        "value",
        "Δ vs CoreInfer [95% CI]",
        "samples",
        "s",
    ):
        table.add_column(col, justify="right")
    for t in study.trials:
        u = t.user_attrs
        p = u.get("params", {})
        d = u.get("vs_coreinfer")
        table.add_row(
            str(t.number),
            t.state.name.lower() + ("" if u.get("feasible", True) else " (infeasible)"),
            _num(p.get("w_sum")),
            _num(p.get("w_count")),
            _num(p.get("threshold"), 3),
            str(p.get("top_k", "-")),
            _fmt(u.get("achieved_mean")),
            _fmt(u.get("density")),
            "-" if t.value is None else f"{t.value:.4g}",
            "-" if not d else f"{d['mean']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}]",
            str(len(u.get("sample_ids", []))),
            _num(u.get("seconds"), 1),
        )
    return [header, table]


def _num(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
