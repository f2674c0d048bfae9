"""``evaluate``: one method on one task sample through lm-eval, as an EvalResult."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from autosparse.errors import TaskError
from autosparse.methods import Method
from autosparse.results import EvalResult, package_versions
from autosparse.tasks.registry import (
    DEFAULT_FEWSHOT,
    DEFAULT_SEED,
    canonical_name,
    lm_eval_errors_only,
    primary_metric,
)


@dataclass
class TaskRun:
    """Everything one evaluation produced: the EvalResult, the realized density of each
    sampled document (aligned with ``result.sample_ids``; None for dense), and
    lm-eval's own output (``results``, ``samples``, ``configs``, ...)."""

    result: EvalResult
    sample_density: list[float | None] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


def eval_settings(
    *,
    limit: int | None,
    seed: int,
    num_fewshot: int | None,
    batch_size: int,
    metric: str | None = None,
    dtype: str | None = None,
    max_gen_toks: int | None = None,
) -> dict[str, Any]:
    """The settings an evaluation is identified by (besides model, task and method)."""
    return {
        "limit": limit,
        "seed": seed,
        "num_fewshot": DEFAULT_FEWSHOT if num_fewshot is None else num_fewshot,
        "batch_size": batch_size,
        "metric": metric,
        "dtype": dtype,
        "max_gen_toks": max_gen_toks,
    }


def _unpack(model: Any, tokenizer: Any) -> tuple[Any, Any, str]:
    """(model, tokenizer, name) from a LoadedModel, a (model, tokenizer) pair, or a model
    plus ``tokenizer=``."""
    name = None
    if hasattr(model, "model") and hasattr(model, "tokenizer"):  # LoadedModel
        loaded = model
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
        name = _identity(loaded.name) or loaded.source
    elif isinstance(model, tuple) and len(model) == 2:
        model, tokenizer = model
    if tokenizer is None:
        raise TaskError("evaluate needs a tokenizer: pass a LoadedModel or tokenizer=")
    if name is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return model, tokenizer, name


def _identity(name: str) -> str | None:
    from autosparse.models import model_identity

    try:
        return model_identity(name)
    except Exception:  # noqa: BLE001 - a name without a stable identity: the caller falls back
        return None


@contextlib.contextmanager
def _rich_progress(enabled: bool) -> Iterator[Any]:
    """A progress callback for SparseLM drawing a bar per request kind (None when no bar
    is drawn: disabled, or stderr is not a terminal)."""
    from autosparse.progress import progress_bars

    with progress_bars(enabled) as progress:
        if progress is None:
            yield None
            return
        bars: dict[str, Any] = {}

        def update(kind: str, advance: int = 0, total: int | None = None) -> None:
            if total is not None:
                label = "generating" if kind == "generate_until" else "scoring"
                bars[kind] = progress.add_task(f"{label} requests", total=total)
            elif kind in bars:
                progress.advance(bars[kind], advance)

        yield update


def _no_progress(kind: str, advance: int = 0, total: int | None = None) -> None:
    return None


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """For simple_evaluate: errors only, and no git hash or environment report."""
    import lm_eval.evaluator as lm_evaluator

    # lm-eval asks git for a commit hash (printing "fatal: not a git repository" outside
    # one) and collects torch's environment report (~0.3 s) on every call; autosparse
    # records its own versions, so skip both.
    saved = lm_evaluator.get_git_commit_hash, lm_evaluator.add_env_info
    lm_evaluator.get_git_commit_hash = lambda: None
    lm_evaluator.add_env_info = lambda storage: None
    try:
        with lm_eval_errors_only():
            yield
    finally:
        lm_evaluator.get_git_commit_hash, lm_evaluator.add_env_info = saved


def _check_metric(task_name: str, task_obj: Any, metric: str | None) -> None:
    """Fail before running when the task cannot report ``metric``."""
    try:
        names = set(task_obj.aggregation() or {})
    except Exception:  # a task class without static aggregations: check after the run
        return
    if metric is not None and names and metric not in names:
        raise TaskError(
            f"the task has no metric {metric!r}; {task_name} reports {', '.join(sorted(names))}"
        )


def _pick_metric(task_results: dict[str, Any], metric: str | None) -> tuple[str, str]:
    """(metric, lm-eval result key "metric,filter") of the primary metric."""
    keys = [k for k in task_results if "," in k and not k.split(",")[0].endswith("_stderr")]
    if metric is None:
        if not keys:
            raise TaskError("the task reported no metrics")
        return keys[0].split(",")[0], keys[0]
    for key in keys:
        if key.split(",")[0] == metric:
            return metric, key
    names = sorted({k.split(",")[0] for k in keys})
    raise TaskError(f"the task has no metric {metric!r}; it reports {', '.join(names)}")


def _metrics(task_results: dict[str, Any], primary_key: str) -> dict[str, float]:
    """Numeric metrics, named without the filter when it is the primary one's."""
    primary_filter = primary_key.split(",", 1)[1]
    out = {}
    for key, value in task_results.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name, filt = key.split(",", 1)
        if name.endswith("_stderr"):
            continue
        out[name if filt == primary_filter else key] = float(value)
    return out


def _sample_score(metric: str, value: Any) -> float:
    """One document's value of the primary metric, on the scale of the task's score."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    from autosparse.tasks.metrics import sentence_score, squad_sample_scores

    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and isinstance(value[0], dict)
        and "prediction_text" in value[0]
    ):  # SQuAD v2 (prediction, reference): percentages like the aggregate
        pred, ref = value
        exact, f1 = squad_sample_scores(
            ref["answers"]["text"], pred["prediction_text"], pred.get("no_answer_probability", 0.0)
        )
        base = metric.split("_")[-1]
        return 100.0 * (f1 if base == "f1" else exact)
    score = sentence_score(metric, value)
    return float("nan") if score is None else score


def evaluate(model: Any, task: str, method: Method, **options: Any) -> EvalResult:
    """Evaluate ``model`` under ``method`` on ``task``: :func:`run_task`'s result, with the
    same keyword options (limit, seed, num_fewshot, batch_size, metric, ids, ...)."""
    return run_task(model, task, method, **options).result


def run_task(
    model: Any,
    task: str,
    method: Method,
    *,
    tokenizer: Any = None,
    limit: int | None = None,
    seed: int = DEFAULT_SEED,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    metric: str | None = None,
    include_path: Any = None,
    model_name: str | None = None,
    progress: bool = True,
    max_length: int | None = None,
    max_gen_toks: int | None = None,
    ids: Sequence[int] | None = None,
) -> TaskRun:
    """Evaluate a model under a sparsity method on one task through lm-eval.

    model: a LoadedModel, a (model, tokenizer) pair, or a model with ``tokenizer=``.
    task: an lm-eval task name, an alias (truthfulqa, bertaqa, csqa, wmt16), a local
    task (truthfulqa-local, csqa-local, nq-local, ...) or a task in ``include_path``.
    limit: score a seeded random sample of this many documents (``sample_ids``), the
    same for every method; None scores all. seed: the sample's seed and lm-eval's
    seeds (few-shot choice included). num_fewshot: default 6 (the reference's); tasks
    whose config fixes 0 shots keep 0. metric: the primary metric (default: the task's
    known primary metric, else its first). Per-document scores of the primary metric
    are kept in ``sample_scores`` (for corpus metrics such as bleu, sentence-level
    scores; the task's own aggregate is ``score``). ids: score exactly these documents
    (overrides ``limit``).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from autosparse.tasks.lm import SparseLM
    from autosparse.tasks.registry import CONFIG_DIR, load_task
    from autosparse.tasks.sampling import draw_sample

    model, tokenizer, default_name = _unpack(model, tokenizer)
    name = canonical_name(task)
    metric = requested = primary_metric(name, metric)
    shots = DEFAULT_FEWSHOT if num_fewshot is None else num_fewshot
    started = time.perf_counter()
    with _quiet_lm_eval():
        task_name, task_obj = load_task(name, include_path)
        n_docs = len(task_obj.eval_docs)
        if n_docs == 0:
            raise TaskError(f"task {task_name!r} has no documents")
        _check_metric(task_name, task_obj, metric)
        if ids is None:
            ids = draw_sample(n_docs, limit, seed)
        else:
            ids = sorted({int(i) for i in ids})
            if not ids or ids[0] < 0 or ids[-1] >= n_docs:
                raise TaskError(f"document ids must be in 0..{n_docs - 1} for {task_name!r}")
        if max_gen_toks is not None:
            gen = dict(task_obj.config.generation_kwargs or {})
            task_obj.config.generation_kwargs = {**gen, "max_gen_toks": int(max_gen_toks)}
        lm = SparseLM(model, tokenizer, batch_size=batch_size, max_length=max_length)
        with _rich_progress(progress) as bar, lm.sparse(method):
            # without our bar, still keep lm-eval's per-request tqdm bars quiet
            lm.progress = bar if bar is not None else _no_progress
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task_obj],
                num_fewshot=shots,
                samples={task_name: ids} if len(ids) < n_docs else None,
                log_samples=True,
                bootstrap_iters=0,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                task_manager=TaskManager(include_path=str(CONFIG_DIR), include_defaults=False),
            )
    seconds = time.perf_counter() - started

    return collect_run(
        out,
        task_name,
        lm,
        ids,
        metric=metric,
        model_name=model_name or default_name,
        method=method,
        seconds=seconds,
        settings=eval_settings(
            limit=limit,
            seed=seed,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            metric=requested,
            dtype=str(getattr(model, "dtype", "")).replace("torch.", "") or None,
            max_gen_toks=max_gen_toks,
        ),
    )


def collect_run(
    out: dict[str, Any],
    task_name: str,
    lm: Any,
    ids: list[int],
    *,
    metric: str | None,
    model_name: str,
    method: Method,
    seconds: float,
    settings: dict[str, Any],
) -> TaskRun:
    """A TaskRun from lm-eval's output (``results`` and logged ``samples``) of one task
    run through ``lm`` (a SparseLM, for the densities) on documents ``ids``."""
    task_results = out["results"][task_name]
    metric, key = _pick_metric(task_results, metric)
    filt = key.split(",", 1)[1]
    by_doc: dict[int, tuple[float, float | None]] = {}
    for sample in out["samples"][task_name]:
        if sample.get("filter", "none") != filt:
            continue
        contexts = [args[0] for args in sample["arguments"] if args and isinstance(args[0], str)]
        by_doc[int(sample["doc_id"])] = (
            _sample_score(metric, sample.get(metric)),
            lm.density_of(contexts),
        )
    if sorted(by_doc) != ids:
        raise TaskError(
            f"lm-eval scored {len(by_doc)} documents of {task_name!r}, expected {len(ids)}"
        )
    result = EvalResult(
        model=model_name,
        task=task_name,
        method=method.to_dict(),
        metric=metric,
        score=float(task_results[key]),
        metrics=_metrics(task_results, key),
        sample_ids=ids,
        sample_scores=[by_doc[i][0] for i in ids],
        density=lm.realized_density(),
        layer_density=lm.layer_density(),
        seconds=seconds,
        settings=settings,
        versions=package_versions(),
    )
    return TaskRun(result=result, sample_density=[by_doc[i][1] for i in ids], raw=dict(out))
