"""Evaluating one method: the evaluator a study's objective names (``make_evaluator``), and
what ``autosparse eval`` runs (``evaluate_method``: the result store is looked up before
the model is loaded). Above ``tasks.evaluator`` and ``fidelity.evaluator``, which both
take ``EvaluatorOptions``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from autosparse.errors import ConfigError
from autosparse.methods import Method
from autosparse.results import EvalResult
from autosparse.tasks.evaluator import OBJECTIVES, EvaluatorOptions, TaskEvaluator


def make_evaluator(objective: str, loaded: Any, options: EvaluatorOptions):
    """The evaluator of a study's ``objective``: ``task`` (the task metric, ``options.
    metric``), or ``fidelity`` / ``kl`` (the fidelity evaluator with that metric, its
    references at their default length)."""
    if objective == "task":
        return TaskEvaluator(loaded, options)
    if objective in ("fidelity", "kl"):
        from autosparse.fidelity.evaluator import FidelityEvaluator

        return FidelityEvaluator(loaded, replace(options, metric=objective))
    raise ConfigError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


# ------------------------------------------------------------------ autosparse eval


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate_method`` returns: the result, and whether it came from the store."""

    result: EvalResult
    cached: bool


def evaluate_method(
    model: str,
    task: str,
    method: Method,
    *,
    limit: int | None = None,
    seed: int = 42,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    metric: str | None = None,
    include_path: Sequence[str | Path] = (),
    max_gen_toks: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    storage: str | None = None,
    force: bool = False,
    progress: bool = True,
    load: Callable[[str, str, str], Any] | None = None,
) -> Evaluation:
    """Evaluate ``method`` with ``model`` (an alias, hub id or folder) on a seeded sample
    of ``limit`` documents of ``task`` (``tasks.sampling.sample_ids``; None: all),
    cached in the result store at ``storage`` (default ``store.DEFAULT_URL``).

    The store is looked up first and the model is loaded (``load(model, device,
    dtype)``, default ``models.load_model``) only when nothing is stored; ``force``
    skips the lookup. ``metric`` "fidelity" or "kl" scores the method on the dense
    model's own continuations (``FidelityEvaluator``; with ``force`` nothing is read
    from or written to the store); any other value names the task metric (None: the
    task's primary metric). Every option, ``include_path`` included, reaches the
    evaluation."""
    from autosparse.models import model_identity, resolve_device, resolve_dtype
    from autosparse.store import DEFAULT_URL, ResultStore
    from autosparse.tasks.registry import canonical_name

    if load is None:
        from autosparse.models import load_model

        def load(name: str, device: str, dtype: str) -> Any:
            return load_model(name, device=device, dtype=dtype)

    task_name = canonical_name(task)
    model_id = model_identity(model)
    dtype_name = str(resolve_dtype(dtype, resolve_device(device))).replace("torch.", "")
    include = [str(p) for p in include_path]
    with ResultStore(storage or DEFAULT_URL) as store:
        if metric in ("fidelity", "kl"):
            return _evaluate_fidelity(
                lambda: load(model, device, dtype),
                method,
                EvaluatorOptions(
                    model_id=model_id,
                    task=task_name,
                    num_fewshot=num_fewshot,
                    batch_size=batch_size,
                    metric=metric,
                    seed=seed,
                    max_gen_toks=max_gen_toks,
                    include_path=tuple(include),
                    dtype=dtype_name,
                    store=None if force else store,
                    progress=progress,
                ),
                limit,
            )
        from autosparse.tasks.evaluation import eval_settings, run_task
        from autosparse.tasks.registry import primary_metric

        settings = eval_settings(
            limit=limit,
            seed=seed,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            metric=primary_metric(task_name, metric),
            dtype=dtype_name,
            max_gen_toks=max_gen_toks,
        )
        if include:
            settings["include_path"] = include
        if not force:
            hit = store.find(model_id, task_name, method, settings)
            if hit is not None:
                return Evaluation(hit.result(), cached=True)
        result = run_task(
            load(model, device, dtype),
            task_name,
            method,
            limit=limit,
            seed=seed,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            metric=metric,
            include_path=include or None,
            model_name=model_id,
            max_gen_toks=max_gen_toks,
            progress=progress,
        ).result
        result.settings = settings
        store.save(result)
        return Evaluation(result, cached=False)


def _evaluate_fidelity(
    load: Callable[[], Any], method: Method, options: EvaluatorOptions, limit: int | None
) -> Evaluation:
    from autosparse.fidelity.evaluator import FidelityEvaluator
    from autosparse.tasks.sampling import sample_ids

    evaluator = FidelityEvaluator(load, options)
    ids = sample_ids(options.task, limit, options.seed, include_path=options.include)
    hit = evaluator.find(method, ids)
    if hit is not None:
        return Evaluation(hit, cached=True)
    return Evaluation(evaluator.run(method, ids), cached=False)
