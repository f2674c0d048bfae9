"""``FidelityEvaluator``: the ``tuning.Evaluator`` of the fidelity objective (see the
package docstring): references from memory, the result store, or generated once;
every method scored on them in teacher-forced passes, prompts run once per batch."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from autosparse.errors import ConfigError, TaskError
from autosparse.fidelity.references import REFERENCE_VERSION, generate_references, prompt_sha
from autosparse.fidelity.scoring import Scored, score_batch, score_continuations
from autosparse.methods import Method
from autosparse.results import EvalResult, Reference, package_versions
from autosparse.stats import mean
from autosparse.tasks.evaluator import EvaluatorOptions, ModelHandle

METRICS = {"fidelity": "fidelity", "kl": "neg_kl", "neg_kl": "neg_kl"}


class FidelityEvaluator:
    """Scores methods by how closely they follow the dense model's own continuations.

    loaded: see ``tasks.evaluator.ModelHandle`` (a function loading the model is called
    only when a result is not in the store). options: as for ``TaskEvaluator``, with
    ``metric`` "fidelity" (None) or "kl" (per-sample scores are then ``-kl``, named
    ``neg_kl``) and ``prompt_cache_gb`` the memory for prompts run once; its
    ``max_gen_toks`` does not apply (the references' length is ``max_new_tokens``).
    Shots are resolved as lm-eval does (a task config that fixes 0 keeps 0; None means
    the reference's 6); the few-shot examples of document i are drawn with seed
    ``seed * 1_000_003 + i``, so a document's prompt does not depend on which other
    documents are evaluated.

    max_new_tokens: the references' length. min_new_tokens: end-of-sequence is
    suppressed until this many tokens exist (capped at max_new_tokens): an instruct
    model often ends right after a short prompt, leaving no position for the sparse
    layers to influence. top_k: dense log-probabilities kept per reference position for
    the KL. prompts: {doc id: prompt text} to use instead of the task's (the task name
    then only labels results).
    """

    def __init__(
        self,
        loaded: Any,
        options: EvaluatorOptions,
        *,
        max_new_tokens: int = 32,
        min_new_tokens: int = 16,
        top_k: int = 64,
        prompts: Mapping[int, str] | None = None,
    ):
        from autosparse.engine.prompt_cache import PromptCache

        if options.metric is not None and options.metric not in METRICS:
            raise ConfigError(f"unknown fidelity metric {options.metric!r}; choose fidelity or kl")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        if top_k < 1:
            raise ConfigError(f"top_k must be at least 1, not {top_k}")
        self.options = options
        self._model = ModelHandle(loaded)
        task = options.task
        if prompts is None:
            from autosparse.tasks.registry import canonical_name

            task = canonical_name(task)
        self.task = task
        self.model_id = options.model_id
        self.store = options.store
        self.batch_size = options.batch_size
        self.max_new_tokens = int(max_new_tokens)
        self.min_new_tokens = max(1, min(int(min_new_tokens), self.max_new_tokens))
        self.top_k = int(top_k)
        self.metric = METRICS[options.metric or "fidelity"]
        self._prompts: dict[int, str] | None = (
            None if prompts is None else {int(k): v for k, v in prompts.items()}
        )
        self._task_obj = None
        self._shots: int | None = None if prompts is None else 0
        self._references: dict[int, Reference] = {}
        self._layer_density: list[float] | None = None
        #: how many times the dense model generated (one call per batch of new references)
        self.generate_calls = 0
        #: batches of prompts run once (engine.prompts), by their documents, selector, token ratio
        #: and layers; at most prompt_cache_gb of them (0: every run runs its prompts
        #: again, in one pass with the continuations)
        self.prompt_cache = PromptCache.of_gib(options.prompt_cache_gb)

    @property
    def model(self) -> Any:
        return self._model.model

    @property
    def tokenizer(self) -> Any:
        return self._model.tokenizer

    @property
    def dtype(self) -> str:
        return self.options.dtype or self._model.dtype

    # -- documents and prompts ---------------------------------------------------
    def _task(self):
        if self._task_obj is None:
            from autosparse.tasks.registry import DEFAULT_FEWSHOT, lm_eval_errors_only, load_task

            with lm_eval_errors_only():
                _, self._task_obj = load_task(self.task, self.options.include)
            fixed = self._task_obj.get_config("num_fewshot")
            if fixed == 0:
                self._shots = 0
            else:
                shots = self.options.num_fewshot
                self._shots = DEFAULT_FEWSHOT if shots is None else shots
        return self._task_obj

    @property
    def shots(self) -> int:
        if self._shots is None:
            self._task()
        return int(self._shots or 0)

    def document_ids(self) -> list[int]:
        if self._prompts is not None:
            return sorted(self._prompts)
        return list(range(len(self._task().eval_docs)))

    def prompt(self, doc_id: int) -> str:
        """The text the dense model continues: lm-eval's context for the document
        (``fewshot_context``: description, shots, ``doc_to_text``), without an answer.
        At 0 shots this is ``tasks.sampling.prompt_text`` for the usual tasks."""
        if self._prompts is not None:
            try:
                return self._prompts[int(doc_id)]
            except KeyError:
                raise TaskError(f"no prompt for document {doc_id}") from None
        task_obj = self._task()
        docs = task_obj.eval_docs
        if not 0 <= int(doc_id) < len(docs):
            raise TaskError(f"document ids must be in 0..{len(docs) - 1} for {self.task!r}")
        doc = docs[int(doc_id)]
        if self.shots == 0:
            from autosparse.tasks.sampling import prompt_text

            return prompt_text(task_obj, doc)
        task_obj.set_fewshot_seed(self.options.seed * 1_000_003 + int(doc_id))
        text = task_obj.fewshot_context(doc=doc, num_fewshot=self.shots)
        if not isinstance(text, str):
            raise TaskError(f"{self.task!r} builds several contexts per document; not supported")
        return text

    # -- references ----------------------------------------------------------------
    def reference_settings(self) -> dict[str, Any]:
        settings = {
            "kind": "fidelity-reference",
            "version": REFERENCE_VERSION,
            "num_fewshot": self.shots,
            "seed": self.options.seed if self.shots else None,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "top_k": self.top_k,
            "dtype": self.dtype,
        }
        if self.options.include_path:
            settings["include_path"] = list(self.options.include_path)
        return settings

    def _reference_key(self) -> str:
        from autosparse.store import settings_key

        return settings_key(self.reference_settings())

    def references(self, ids: Sequence[int]) -> dict[int, Reference]:
        """The references of ``ids``: from memory, else from the store, else generated
        (one greedy ``generate`` call per batch of missing documents) and stored."""
        ids = [int(i) for i in ids]
        texts = {i: self.prompt(i) for i in ids if i not in self._references}
        if texts and self.store is not None:
            found = self.store.load_references(
                self.model_id, self.task, self._reference_key(), list(texts)
            )
            for i, ref in found.items():
                if ref.prompt_sha == prompt_sha(texts[i]):
                    self._references[i] = ref
        missing = [i for i in ids if i not in self._references]
        if missing:
            new = generate_references(
                self.model,
                self.tokenizer,
                {i: texts[i] for i in missing},
                max_new_tokens=self.max_new_tokens,
                min_new_tokens=self.min_new_tokens,
                top_k=self.top_k,
                batch_size=self.batch_size,
                progress=self.options.progress,
            )
            self.generate_calls += -(-len(missing) // self.batch_size)
            self._references.update(new)
            if self.store is not None:
                self.store.save_references(
                    self.model_id, self.task, self._reference_key(), list(new.values())
                )
        return {i: self._references[i] for i in ids}

    # -- evaluation ----------------------------------------------------------------
    def _settings(self, ids: Sequence[int]) -> dict[str, Any]:
        settings = {
            "objective": "fidelity",
            "ids": [int(i) for i in ids],
            "seed": self.options.seed,
            "num_fewshot": self.shots,
            "batch_size": self.batch_size,
            "metric": self.metric,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "top_k": self.top_k,
            "dtype": self.dtype,
        }
        if self.options.include_path:
            settings["include_path"] = list(self.options.include_path)
        return settings

    def find(self, method: Method, ids: Sequence[int]) -> EvalResult | None:
        """The stored result ``run(method, ids)`` would return, or None (always None
        without a store). Needs the task's documents but not the model when the options
        give the dtype."""
        ids = sorted({int(i) for i in ids})
        if self.store is None or not ids:
            return None
        hit = self.store.find(self.model_id, self.task, method, self._settings(ids))
        return None if hit is None else hit.result()

    def run(self, method: Method, ids: Sequence[int]) -> EvalResult:
        """Score ``method`` on the references of ``ids`` (sorted, duplicates dropped);
        ``sample_scores`` follow ``sample_ids``. ``seconds`` counts the scoring only;
        generating missing references is reported as ``metrics["reference_seconds"]``."""

        ids = sorted({int(i) for i in ids})
        if not ids:
            raise ConfigError("no documents to evaluate")
        hit = self.find(method, ids)
        if hit is not None:
            return hit
        settings = self._settings(ids)
        t0 = time.perf_counter()
        refs = self.references(ids)
        reference_seconds = time.perf_counter() - t0
        scored = self._score(method, [refs[i] for i in ids])
        seconds = time.perf_counter() - t0 - reference_seconds
        fid = [s.fidelity for s in scored]
        kl = [float("nan") if s.kl is None else s.kl for s in scored]
        per_sample = fid if self.metric == "fidelity" else [-k for k in kl]
        densities = [s.density for s in scored if s.density is not None]
        dense_fid = [refs[i].dense_fidelity for i in ids]
        metrics = {
            "fidelity": mean(fid),
            "kl": mean(kl),
            "neg_kl": -mean(kl),
            "dense_fidelity": mean(dense_fid),
            "tokens": mean([len(refs[i].continuation) for i in ids]),
            "reference_seconds": reference_seconds,
        }

        result = EvalResult(
            model=self.model_id,
            task=self.task,
            method=method.to_dict(),
            metric=self.metric,
            score=mean(per_sample),
            metrics=metrics,
            sample_ids=ids,
            sample_scores=per_sample,
            density=mean(densities) if densities else None,
            layer_density=self._layer_density,
            seconds=seconds,
            settings=settings,
            versions=package_versions(),
        )
        if self.store is not None:
            self.store.save(result)
        return result

    def _score(self, method: Method, refs: Sequence[Reference]) -> list[Scored]:
        import torch

        cached = self.prompt_cache.enabled
        # batches of similar prompt lengths (little padding of the kept prompts), or of
        # similar total lengths for the one-pass path
        order = sorted(
            range(len(refs)),
            key=lambda j: (
                -len(refs[j].prompt_ids) - (0 if cached else len(refs[j].continuation)),
                refs[j].doc_id,
            ),
        )
        chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else int(pad)
        model = self.model
        # the prompts run dense, before the method's patch is on
        prompts = (
            [self._prompts_of(method, [refs[j] for j in c], pad) for c in chunks] if cached else []
        )
        results: dict[int, Scored] = {}
        self._layer_density = None
        with method.apply(model) as engine, torch.no_grad():
            for n, chunk in enumerate(chunks):
                batch_refs = [refs[j] for j in chunk]
                seen = engine.kept_counts().shape[0] if engine is not None else 0
                if cached:
                    means, kls = score_continuations(model, engine, prompts[n], batch_refs)
                else:
                    means, _, kls = score_batch(
                        model,
                        [(r.prompt_ids, r.continuation) for r in batch_refs],
                        engine,
                        references=batch_refs,
                        pad_id=pad,
                    )
                dens = engine.sequence_density()[seen:].tolist() if engine is not None else None
                for b, j in enumerate(chunk):
                    results[j] = Scored(
                        fidelity=means[b],
                        kl=float(kls[b].mean()),
                        density=None if dens is None else float(dens[b]),
                    )
            if engine is not None:
                self._layer_density = engine.layer_density()
        return [results[j] for j in range(len(refs))]

    def _prompts_of(self, method: Method, refs: Sequence[Reference], pad: int):
        """The batch of ``refs``' prompts run dense once (``engine.prompts``), from the
        prompt cache or run now."""
        from autosparse.engine.prompts import run_prompts

        key = (
            tuple(r.doc_id for r in refs),
            method.selector,
            method.token_ratio,
            repr(method.layers),
        )
        return self.prompt_cache.get(
            key,
            lambda: run_prompts(
                self.model,
                [r.prompt_ids for r in refs],
                token_ratio=method.token_ratio,
                layers=method.layers,
                pad_id=pad,
                selector=method.selector,
            ),
        )
