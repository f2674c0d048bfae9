"""``PreparedTask``: a task's lm-eval requests for a fixed set of documents, built once
and answered again under any method.

A tuning study evaluates the same screen hundreds of times (every trial, in growing
slices). ``run_task`` goes through ``lm_eval.simple_evaluate`` on every call, which
rebuilds the task, its prompts and its requests and logs every sample: a fixed cost
per call that is a large share of a short trial. ``PreparedTask`` does that set-up
once: it builds the requests for all documents exactly as ``simple_evaluate`` would
(same few-shot rules and seeds, documents in id order), and each ``run`` answers the
requests of the asked documents with the model wrapper, applies the task's filters,
and scores each document with the task's own ``process_results`` and aggregations.

On the documents it was built for, ``run`` gives what ``run_task`` gives. On a subset,
each document keeps the prompt it has in the whole set: with few-shot examples drawn
from a shared random stream, a document's prompt under ``simple_evaluate`` depends on
which other documents are evaluated with it, so a prepared screen is also the way to
compare every slice of it with a baseline on identical prompts.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from autosparse.errors import TaskError
from autosparse.methods import Method
from autosparse.tasks.evaluation import (
    TaskRun,
    _check_metric,
    _no_progress,
    _rich_progress,
    _unpack,
    collect_run,
    eval_settings,
)
from autosparse.tasks.registry import (
    DEFAULT_FEWSHOT,
    DEFAULT_SEED,
    canonical_name,
    lm_eval_errors_only,
    primary_metric,
)


class PreparedTask:
    """The requests of ``task`` for documents ``ids``, built once (the arguments mean what
    they mean for :func:`autosparse.tasks.evaluation.run_task`)."""

    def __init__(
        self,
        model: Any,
        task: str,
        ids: Sequence[int],
        *,
        tokenizer: Any = None,
        seed: int = DEFAULT_SEED,
        num_fewshot: int | None = None,
        batch_size: int = 1,
        metric: str | None = None,
        include_path: Any = None,
        model_name: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int | None = None,
    ):
        import numpy as np
        import torch

        from autosparse.tasks.lm import SparseLM
        from autosparse.tasks.registry import load_task

        model, tokenizer, default_name = _unpack(model, tokenizer)
        self.model = model
        self.model_name = model_name or default_name
        name = canonical_name(task)
        self._requested_metric = primary_metric(name, metric)
        self._settings = dict(
            seed=seed,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            metric=self._requested_metric,
            max_gen_toks=max_gen_toks,
        )
        with lm_eval_errors_only():
            self.task_name, task_obj = load_task(name, include_path)
            n_docs = len(task_obj.eval_docs)
            self.ids = sorted({int(i) for i in ids})
            if not self.ids or self.ids[0] < 0 or self.ids[-1] >= n_docs:
                raise TaskError(f"document ids must be in 0..{n_docs - 1} for {self.task_name!r}")
            _check_metric(self.task_name, task_obj, self._requested_metric)
            if max_gen_toks is not None:
                gen = dict(task_obj.config.generation_kwargs or {})
                task_obj.config.generation_kwargs = {**gen, "max_gen_toks": int(max_gen_toks)}
            # simple_evaluate's rules: a task whose config fixes 0 shots keeps 0
            shots = DEFAULT_FEWSHOT if num_fewshot is None else num_fewshot
            if task_obj.get_config("num_fewshot") != 0:
                task_obj.set_config(key="num_fewshot", value=shots)
            # ... and its seeds, set before the prompts are built
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            task_obj.set_fewshot_seed(seed=seed)
            task_obj.build_all_requests(samples=self.ids, rank=0, world_size=1)
        self.task = task_obj
        # lm-eval numbers the instances by position in the sample; file them by doc id
        self._instances: dict[int, list[Any]] = defaultdict(list)
        for instance in task_obj.instances:
            self._instances[self.ids[instance.doc_id]].append(instance)
        for group in self._instances.values():
            group.sort(key=lambda inst: inst.idx)
        docs = task_obj.eval_docs
        self._docs = {i: docs[i] for i in self.ids}
        if task_obj.OUTPUT_TYPE == "multiple_choice":
            _remember_choices(task_obj, self._docs.values())
        with lm_eval_errors_only():  # lm-eval warns that a model object is not a name
            self.lm = SparseLM(model, tokenizer, batch_size=batch_size, max_length=max_length)

    def run(
        self, method: Method, ids: Sequence[int] | None = None, *, progress: bool = False
    ) -> TaskRun:
        """Evaluate ``method`` on ``ids`` (default: every prepared document)."""
        ids = self.ids if ids is None else sorted({int(i) for i in ids})
        missing = [i for i in ids if i not in self._docs]
        if not ids or missing:
            raise TaskError(
                f"documents {missing[:5]} of {self.task_name!r} were not prepared"
                if missing
                else "no documents to evaluate"
            )
        instances = [inst for i in ids for inst in self._instances[i]]
        for inst in instances:
            inst.resps, inst.filtered_resps = [], {}
        by_type: dict[str, list[Any]] = defaultdict(list)
        for inst in instances:
            by_type[inst.request_type].extend([inst] * inst.repeats)

        lm = self.lm
        started = time.perf_counter()
        with _rich_progress(progress) as bar, lm.sparse(method):
            lm.progress = bar if bar is not None else _no_progress
            for request_type, requests in by_type.items():
                for inst, response in zip(
                    requests, getattr(lm, request_type)(requests), strict=True
                ):
                    inst.resps.append(response)
        seconds = time.perf_counter() - started

        task = self.task
        with lm_eval_errors_only():
            saved = task._instances
            task._instances = instances
            try:
                task.apply_filters()
            finally:
                task._instances = saved
            raw: dict[tuple[str, str], list[Any]] = defaultdict(list)
            samples = []
            for filter_key in instances[0].filtered_resps:
                for i in ids:
                    group = self._instances[i]
                    metrics = task.process_results(
                        self._docs[i], [inst.filtered_resps[filter_key] for inst in group]
                    )
                    samples.append(
                        {
                            "doc_id": i,
                            "filter": filter_key,
                            "arguments": [inst.args for inst in group],
                            **metrics,
                        }
                    )
                    for name, value in metrics.items():
                        raw[(name, filter_key)].append(value)
            aggregations = task.aggregation()
            results = {
                f"{name},{filter_key}": aggregations[name](values)
                if name in aggregations
                else sum(values) / len(values)
                for (name, filter_key), values in raw.items()
            }
        out = {"results": {self.task_name: results}, "samples": {self.task_name: samples}}
        return collect_run(
            out,
            self.task_name,
            lm,
            list(ids),
            metric=self._requested_metric,
            model_name=self.model_name,
            method=method,
            seconds=seconds,
            settings=eval_settings(
                limit=None,
                dtype=str(getattr(self.model, "dtype", "")).replace("torch.", "") or None,
                **self._settings,
            ),
        )


def _remember_choices(task_obj: Any, docs: Any) -> None:
    """Scoring a multiple-choice document renders its choices again (a Jinja template
    compiled per call, about half a millisecond); the prepared documents never change,
    so render theirs once."""
    render = task_obj.doc_to_choice
    known = {id(doc): (doc, render(doc)) for doc in docs}

    def doc_to_choice(doc: Any, *args: Any, **kwargs: Any) -> Any:
        hit = known.get(id(doc))
        if hit is not None and hit[0] is doc and not args and not kwargs:
            return list(hit[1])
        return render(doc, *args, **kwargs)

    task_obj.doc_to_choice = doc_to_choice
