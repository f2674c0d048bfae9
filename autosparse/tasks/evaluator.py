"""Evaluators: one method on documents of one task with one model, every result cached.

Both evaluators (``TaskEvaluator``: the task's metric through lm-eval;
``fidelity.evaluator.FidelityEvaluator``: closeness to the dense model's own output)
take the same ``EvaluatorOptions`` and follow ``tuning.Evaluator`` (``run(method, ids)``,
``document_ids()``, ``metric``). ``autosparse.evaluate.make_evaluator`` builds the one a
study's objective names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autosparse.errors import ConfigError
from autosparse.methods import Method
from autosparse.results import EvalResult

#: a study's objectives: the task metric, or the dense-fidelity metrics (docs/fidelity.md)
OBJECTIVES = ("task", "fidelity", "kl")


@dataclass(frozen=True)
class EvaluatorOptions:
    """Everything an evaluator needs besides the model; both evaluators take it.

    model_id: the model's identity (``models.model_identity``); results are stored
    under it. task: a task name or alias (the fidelity evaluator, given its own
    prompts, uses it as a label only). num_fewshot: shots; None means the reference's
    6 (a task whose config fixes 0 keeps 0). batch_size: requests (task) or documents
    (fidelity) per model call. metric: the task's primary metric (None: the task's
    own); for the fidelity evaluator "fidelity" (None) or "kl". seed: lm-eval's seeds,
    the few-shot draw included. max_gen_toks: a cap on the tokens generated per
    request of a generation task (fidelity references have their own length).
    include_path: folders or YAML files with the user's own lm-eval task configs.
    dtype: the dtype name results are recorded under; None reads it from the model,
    and giving it lets a stored result be found before the model is loaded. store: a
    ``ResultStore`` caching every result (and the fidelity references), or None.
    progress: draw progress bars on stderr. prompt_cache_gb: the fidelity evaluator's
    memory for prompts run once (0: every run runs its prompts again).
    """

    model_id: str
    task: str
    num_fewshot: int | None = None
    batch_size: int = 8
    metric: str | None = None
    seed: int = 42
    max_gen_toks: int | None = None
    include_path: tuple[str, ...] = ()
    dtype: str | None = None
    store: Any = field(default=None, compare=False, repr=False)
    progress: bool = True
    prompt_cache_gb: float = 4.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, not {self.batch_size}")
        paths = self.include_path
        if isinstance(paths, (str, Path)):
            paths = (paths,)
        object.__setattr__(self, "include_path", tuple(str(p) for p in paths or ()))

    @property
    def include(self) -> list[str] | None:
        """``include_path`` as lm-eval's loaders take it (None when empty)."""
        return list(self.include_path) or None


class ModelHandle:
    """The model an evaluator runs: a ``LoadedModel``, a (model, tokenizer) pair, or a
    function returning either, called the first time the model is needed."""

    def __init__(self, loaded: Any) -> None:
        self._source = loaded
        self._parts: tuple[Any, Any, str] | None = None

    @staticmethod
    def _is_model(value: Any) -> bool:
        return (isinstance(value, tuple) and len(value) == 2) or (
            hasattr(value, "model") and hasattr(value, "tokenizer")
        )

    def _resolve(self) -> tuple[Any, Any, str]:
        if self._parts is None:
            value = self._source
            if not self._is_model(value):
                if not callable(value):
                    raise TypeError(
                        "an evaluator needs a LoadedModel, a (model, tokenizer) pair, "
                        f"or a function returning one, not {type(value).__name__}"
                    )
                value = value()
            if isinstance(value, tuple):
                model, tokenizer = value
                dtype = None
            else:
                model, tokenizer = value.model, value.tokenizer
                dtype = getattr(value, "dtype", None)
            dtype = dtype or next(model.parameters()).dtype
            self._parts = (model, tokenizer, str(dtype).replace("torch.", ""))
        return self._parts

    @property
    def loaded(self) -> bool:
        return self._parts is not None

    @property
    def model(self) -> Any:
        return self._resolve()[0]

    @property
    def tokenizer(self) -> Any:
        return self._resolve()[1]

    @property
    def dtype(self) -> str:
        """The weights' dtype name, e.g. ``float32``."""
        return self._resolve()[2]


class TaskEvaluator:
    """Evaluates methods on documents of one task with one model, through lm-eval.
    Every evaluation is cached in the options' ResultStore (the study's database by
    default), so a resumed study or a second worker never recomputes a baseline. After
    ``prepare(ids)`` (the tuning screen) documents among ``ids`` are answered from
    requests built once (``PreparedTask``), each with the prompt it has in the whole
    screen. ``loaded``: see ``ModelHandle``."""

    def __init__(self, loaded: Any, options: EvaluatorOptions) -> None:
        from autosparse.tasks.registry import canonical_name, primary_metric

        self.options = options
        self._model = ModelHandle(loaded)
        self.task = canonical_name(options.task)
        self.model_id = options.model_id
        self.store = options.store
        self.metric = primary_metric(self.task, options.metric) or options.metric or "score"
        self._n_docs: int | None = None
        self._prepared = None

    def prepare(self, ids: Sequence[int]) -> None:
        """Build the requests of documents ``ids`` once for every later ``run`` on them."""
        from autosparse.tasks.prepared import PreparedTask

        self._prepared = PreparedTask(self._model.model, self.task, ids, **self._run_options())

    def _run_options(self) -> dict[str, Any]:
        """The evaluation options of run_task and PreparedTask."""
        o = self.options
        return {
            "tokenizer": self._model.tokenizer,
            "seed": o.seed,
            "num_fewshot": o.num_fewshot,
            "batch_size": o.batch_size,
            "metric": o.metric,
            "model_name": self.model_id,
            "max_gen_toks": o.max_gen_toks,
            "include_path": o.include,
        }

    def document_ids(self) -> list[int]:
        if self._n_docs is None:
            from autosparse.tasks.registry import load_task

            _, task_obj = load_task(self.task, self.options.include)
            self._n_docs = len(task_obj.eval_docs)
        return list(range(self._n_docs))

    def _settings(
        self, ids: Sequence[int], prompts_of: Sequence[int] | None = None
    ) -> dict[str, Any]:
        o = self.options
        settings: dict[str, Any] = {
            "ids": [int(i) for i in ids],
            "seed": o.seed,
            "num_fewshot": o.num_fewshot,
            "batch_size": o.batch_size,
            "metric": o.metric,
            "max_gen_toks": o.max_gen_toks,
            "dtype": o.dtype or self._model.dtype,
        }
        if o.include_path:
            settings["include_path"] = list(o.include_path)
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
            result = prepared.run(method, ids, progress=self.options.progress).result
        else:
            result = run_task(
                self._model.model,
                self.task,
                method,
                ids=list(ids),
                progress=self.options.progress,
                **self._run_options(),
            ).result
        result.settings = settings
        if self.store is not None:
            self.store.save(result)
        return result
