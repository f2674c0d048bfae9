"""The fidelity objective: how closely a sparse model follows the dense model's own output.

For every document the dense model's greedy continuation of the task prompt is
generated once and stored (a *reference*: up to ``max_new_tokens`` tokens, ending at
the first end-of-sequence token, which is suppressed until ``min_new_tokens`` exist). A trial then scores the sparse model on
each reference in one teacher-forced forward pass over prompt + continuation, with
the engine's continuation-scoring path: the prompt runs dense and selects the core
neurons, every continuation position runs sparse. No generation happens in a trial.

Per document:

- ``fidelity``: the mean log-likelihood (nats per token) the sparse model gives the
  dense continuation. Higher is better; the dense model's own value is the ceiling
  in practice. The first continuation token is predicted by the last prompt
  position, which runs dense (as the first generated token does in real decoding),
  so it contributes the same value under every method.
- ``kl``: the mean over continuation positions of KL(dense || sparse) between the
  next-token distributions, in nats. Lower is better. Full dense distributions are
  too large to store (vocabulary x tokens x documents), so the reference keeps the
  dense model's ``top_k`` log-probabilities per position, and the KL is taken
  between the two distributions coarse-grained to those ``top_k`` tokens plus one
  bucket for the rest of the vocabulary. This is exact when the dense top-k hold
  all the mass and otherwise a lower bound of the full KL (coarse-graining never
  increases a divergence). With ``metric="kl"`` the per-sample scores are ``-kl``
  so that higher is better everywhere (the metric is then named ``neg_kl``).

References are keyed by model identity, task, document id and the prompt settings
(shots, seed, ``max_new_tokens``, ``top_k``, dtype), kept in memory and, when the
evaluator has a ResultStore, in a table of the same database
(``autosparse_fidelity_references``), so a resumed study, a second worker or a
later ``eval`` never regenerates them. A stored reference whose prompt text no
longer matches (changed task data) is regenerated.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy import DateTime, Float, Integer, LargeBinary, String, UniqueConstraint, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from autosparse.errors import ConfigError, StorageError, TaskError
from autosparse.methods import Method
from autosparse.results import EvalResult

#: bump when the meaning of a stored reference changes
REFERENCE_VERSION = 1
METRICS = {"fidelity": "fidelity", "kl": "neg_kl", "neg_kl": "neg_kl"}


# ----------------------------------------------------------------- references


@dataclass(frozen=True, eq=False)
class Reference:
    """The dense model's greedy continuation of one document's prompt.

    ``prompt_ids`` and ``continuation`` are token ids (the continuation ends at the
    first end-of-sequence token, inclusive, or after ``max_new_tokens``).
    ``top_ids`` (C, k) int64 and ``top_logprobs`` (C, k) float32 are the dense
    model's k most likely next tokens and their log-probabilities at each
    continuation position, from a teacher-forced dense pass. ``dense_fidelity`` is
    the dense model's mean log-likelihood of the continuation (same pass)."""

    doc_id: int
    prompt_sha: str
    prompt_ids: tuple[int, ...]
    continuation: tuple[int, ...]
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    dense_fidelity: float


def prompt_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class _Base(DeclarativeBase):
    pass


class _ReferenceRow(_Base):
    __tablename__ = "autosparse_fidelity_references"
    __table_args__ = (
        UniqueConstraint("model", "task", "settings_key", "doc_id", name="uq_autosparse_fidref"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    model: Mapped[str] = mapped_column(String(512))
    task: Mapped[str] = mapped_column(String(256))
    settings_key: Mapped[str] = mapped_column(String(64))
    doc_id: Mapped[int] = mapped_column(Integer)
    prompt_sha: Mapped[str] = mapped_column(String(64))
    prompt_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int32
    continuation: Mapped[bytes] = mapped_column(LargeBinary)  # int32
    top_k: Mapped[int] = mapped_column(Integer)
    top_ids: Mapped[bytes] = mapped_column(LargeBinary)  # (C, k) int32
    top_logprobs: Mapped[bytes] = mapped_column(LargeBinary)  # (C, k) float32
    dense_fidelity: Mapped[float] = mapped_column(Float)


def _ints(b: bytes) -> tuple[int, ...]:
    return tuple(int(x) for x in np.frombuffer(b, dtype=np.int32))


class ReferenceTable:
    """References in the database of a ResultStore (its own table, created on first use).
    Uses only the store's public ``session()``."""

    def __init__(self, store) -> None:
        self.store = store
        with store.session() as s:
            _Base.metadata.create_all(s.connection())

    def load(
        self, model: str, task: str, settings_key: str, ids: Sequence[int]
    ) -> dict[int, Reference]:
        stmt = select(_ReferenceRow).where(
            _ReferenceRow.model == model,
            _ReferenceRow.task == task,
            _ReferenceRow.settings_key == settings_key,
            _ReferenceRow.doc_id.in_([int(i) for i in ids]),
        )
        out: dict[int, Reference] = {}
        with self.store.session() as s:
            for row in s.scalars(stmt):
                cont = _ints(row.continuation)
                shape = (len(cont), row.top_k)
                out[row.doc_id] = Reference(
                    doc_id=row.doc_id,
                    prompt_sha=row.prompt_sha,
                    prompt_ids=_ints(row.prompt_ids),
                    continuation=cont,
                    top_ids=np.frombuffer(row.top_ids, dtype=np.int32)
                    .reshape(shape)
                    .astype(np.int64),
                    top_logprobs=np.frombuffer(row.top_logprobs, dtype=np.float32)
                    .reshape(shape)
                    .copy(),
                    dense_fidelity=float(row.dense_fidelity),
                )
        return out

    def save(self, model: str, task: str, settings_key: str, refs: Sequence[Reference]) -> None:
        """Insert or replace. A row another worker inserted meanwhile is left as it is."""
        for ref in refs:
            row = _ReferenceRow(
                created=datetime.now(timezone.utc),
                model=model,
                task=task,
                settings_key=settings_key,
                doc_id=int(ref.doc_id),
                prompt_sha=ref.prompt_sha,
                prompt_ids=np.asarray(ref.prompt_ids, dtype=np.int32).tobytes(),
                continuation=np.asarray(ref.continuation, dtype=np.int32).tobytes(),
                top_k=int(ref.top_ids.shape[1]),
                top_ids=np.ascontiguousarray(ref.top_ids, dtype=np.int32).tobytes(),
                top_logprobs=np.ascontiguousarray(ref.top_logprobs, dtype=np.float32).tobytes(),
                dense_fidelity=float(ref.dense_fidelity),
            )
            try:
                with self.store.session() as s:
                    old = s.scalars(
                        select(_ReferenceRow).where(
                            _ReferenceRow.model == model,
                            _ReferenceRow.task == task,
                            _ReferenceRow.settings_key == settings_key,
                            _ReferenceRow.doc_id == int(ref.doc_id),
                        )
                    ).first()
                    if old is not None:
                        s.delete(old)
                        s.flush()
                    s.add(row)
            except StorageError as exc:
                if not isinstance(exc.__cause__, IntegrityError):
                    raise


# ----------------------------------------------------------------- the math


def topk_kl(dense_top_logprobs: Any, dense_top_ids: Any, sparse_logprobs: Any) -> Any:
    """KL(dense || sparse) per position, both distributions coarse-grained to the dense
    top-k tokens plus one bucket for the rest of the vocabulary.

    dense_top_logprobs (C, k), dense_top_ids (C, k) long, sparse_logprobs (C, V) full
    log-softmax. Returns (C,) float, clamped at 0 (rounding can make it -1e-9)."""
    import torch

    ld = dense_top_logprobs.float()
    ls = sparse_logprobs.float().gather(-1, dense_top_ids)  # (C, k)
    head = (ld.exp() * (ld - ls)).sum(-1)  # (C,)

    def log_rest(lp: torch.Tensor) -> torch.Tensor:  # log(1 - sum exp(lp)), stable
        lse = torch.logsumexp(lp, dim=-1).clamp(max=-1e-12)
        return torch.log(-torch.expm1(lse))

    rest_d, rest_s = log_rest(ld), log_rest(ls)
    tail = torch.where(
        torch.isfinite(rest_d), rest_d.exp() * (rest_d - rest_s), torch.zeros_like(rest_d)
    )
    return (head + tail).clamp(min=0.0)


@dataclass(frozen=True)
class Scored:
    """One document scored under one method."""

    fidelity: float  # mean log-likelihood of the reference continuation
    kl: float | None  # mean coarse-grained KL(dense || sparse); None without top-k
    density: float | None


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def score_batch(
    model,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    engine=None,
    *,
    top_k: int = 0,
    references: Sequence[Reference] | None = None,
    pad_id: int = 0,
) -> tuple[list[float], list[Any], list[Any | None]]:
    """One right-padded, teacher-forced forward pass over ``(prompt_ids, continuation)``
    rows. With an ``engine``, positions from each row's prompt length on run sparse.

    Returns per row: the mean log-likelihood of the continuation, ``(top_ids,
    top_logprobs)`` of the k most likely tokens at each continuation position (when
    ``top_k`` > 0, else None), and the (C,) KL to ``references[i]`` (when given)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    # the last continuation token is never an input: its logits would predict beyond it
    inputs = [list(p) + list(c)[:-1] for p, c in rows]
    prompt_lengths = [len(p) for p, _ in rows]
    if min(prompt_lengths) < 1 or min(len(c) for _, c in rows) < 1:
        raise ConfigError("fidelity scoring needs a non-empty prompt and continuation")
    width = max(len(x) for x in inputs)
    batch = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    for b, x in enumerate(inputs):
        batch[b, : len(x)] = torch.tensor(x, dtype=torch.long)
    # right padding only follows a row's own tokens: under the causal mask it changes
    # no scored position, so no attention mask is needed (as in SparseLM)
    keep = width - min(prompt_lengths) + 1  # positions from the earliest predicting one
    kwargs = {"logits_to_keep": keep} if _accepts(model, "logits_to_keep") else {}
    offset = width - keep if kwargs else 0
    scoring = engine.scoring(prompt_lengths) if engine is not None else contextlib.nullcontext()
    with scoring:
        logits = model(input_ids=batch, use_cache=False, **kwargs).logits  # (B, keep, V)
    means, tops, kls = [], [], []
    for b, (p, c) in enumerate(rows):
        start = len(p) - 1 - offset
        lp = F.log_softmax(logits[b, start : start + len(c)].float(), dim=-1)  # (C, V)
        target = torch.tensor(list(c), dtype=torch.long, device=device)
        means.append(float(lp.gather(-1, target.unsqueeze(-1)).mean()))
        if top_k > 0:
            values, ids = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
            tops.append((ids.cpu().numpy(), values.cpu().numpy()))
        else:
            tops.append(None)
        if references is not None:
            ref = references[b]
            kl = topk_kl(
                torch.as_tensor(ref.top_logprobs, device=device),
                torch.as_tensor(ref.top_ids, device=device),
                lp,
            )
            kls.append(kl)
        else:
            kls.append(None)
    return means, tops, kls


# ----------------------------------------------------------------- the evaluator


def _unpack(loaded) -> tuple[Any, Any, str]:
    if isinstance(loaded, tuple) and len(loaded) == 2:
        model, tokenizer = loaded
    else:
        model, tokenizer = loaded.model, loaded.tokenizer
    dtype = getattr(loaded, "dtype", None) or next(model.parameters()).dtype
    return model, tokenizer, str(dtype).replace("torch.", "")


class FidelityEvaluator:
    """The ``tuning.Evaluator`` protocol with the fidelity objective; a drop-in for
    ``workflow.TaskEvaluator`` (same constructor arguments, plus a few of its own).

    loaded: a LoadedModel or a (model, tokenizer) pair. task: the task whose prompts
    are continued. num_fewshot: shots in the prompt, resolved as lm-eval does (a task
    config that fixes 0 keeps 0; None means the reference's 6); the few-shot examples
    of document i are drawn with seed ``seed * 1_000_003 + i``, so a document's prompt
    does not depend on which other documents are evaluated. metric: "fidelity"
    (default) or "kl" (per-sample scores are then ``-kl``, named ``neg_kl``).
    max_new_tokens: the reference length (``max_gen_toks``, if given, overrides it, so
    TaskEvaluator's arguments can be passed unchanged). min_new_tokens: end-of-sequence
    is suppressed until this many tokens exist (capped at max_new_tokens): an instruct
    model often ends right after a short prompt, leaving no position for the sparse
    layers to influence. top_k: dense log-probabilities
    kept per reference position for the KL. store: a ResultStore; results and
    references are cached in its database. prompts: {doc id: prompt text} to use
    instead of the task's (the task name then only labels results).
    """

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
        max_new_tokens: int = 32,
        min_new_tokens: int = 16,
        top_k: int = 64,
        seed: int = 42,
        store=None,
        progress: bool = True,
        prompts: Mapping[int, str] | None = None,
        prompt_cache_gb: float = 4.0,
    ):
        if metric is not None and metric not in METRICS:
            raise ConfigError(f"unknown fidelity metric {metric!r}; choose fidelity or kl")
        if max_gen_toks is not None:
            max_new_tokens = int(max_gen_toks)
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        min_new_tokens = max(1, min(int(min_new_tokens), max_new_tokens))
        if batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, not {batch_size}")
        if top_k < 1:
            raise ConfigError(f"top_k must be at least 1, not {top_k}")
        self.loaded = loaded
        self.model, self.tokenizer, self.dtype = _unpack(loaded)
        if prompts is None:
            from autosparse.tasks.registry import canonical_name

            task = canonical_name(task)
        self.task = task
        self.model_id = model_id
        self.num_fewshot = num_fewshot
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.min_new_tokens = min_new_tokens
        self.top_k = int(top_k)
        self.seed = seed
        self.store = store
        self.progress = progress
        self.metric = METRICS[metric or "fidelity"]
        self._prompts: dict[int, str] | None = (
            None if prompts is None else {int(k): v for k, v in prompts.items()}
        )
        self._task_obj = None
        self._shots: int | None = None if prompts is None else 0
        self._references: dict[int, Reference] = {}
        self._table = None if store is None else ReferenceTable(store)
        self._layer_density: list[float] | None = None
        #: how many times the dense model generated (one call per batch of new references)
        self.generate_calls = 0
        #: batches of prompts run once (engine.prompts), by their documents, least
        #: recently used first; at most prompt_cache_gb of them (0: every trial runs
        #: its prompts again, in one pass with the continuations)
        self.prompt_cache_bytes = int(max(0.0, float(prompt_cache_gb)) * 2**30)
        self._prompt_batches: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        #: how many batches of prompts were run (cache misses)
        self.prompt_runs = 0

    # -- documents and prompts ---------------------------------------------------
    def _task(self):
        if self._task_obj is None:
            from autosparse.tasks.evaluation import _lm_eval_errors_only
            from autosparse.tasks.registry import DEFAULT_FEWSHOT, load_task

            with _lm_eval_errors_only():
                _, self._task_obj = load_task(self.task)
            fixed = self._task_obj.get_config("num_fewshot")
            if fixed == 0:
                self._shots = 0
            else:
                self._shots = DEFAULT_FEWSHOT if self.num_fewshot is None else self.num_fewshot
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
        task_obj.set_fewshot_seed(self.seed * 1_000_003 + int(doc_id))
        text = task_obj.fewshot_context(doc=doc, num_fewshot=self.shots)
        if not isinstance(text, str):
            raise TaskError(f"{self.task!r} builds several contexts per document; not supported")
        return text

    # -- references ----------------------------------------------------------------
    def reference_settings(self) -> dict[str, Any]:
        return {
            "kind": "fidelity-reference",
            "version": REFERENCE_VERSION,
            "num_fewshot": self.shots,
            "seed": self.seed if self.shots else None,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "top_k": self.top_k,
            "dtype": self.dtype,
        }

    def _reference_key(self) -> str:
        from autosparse.store import settings_key

        return settings_key(self.reference_settings())

    def references(self, ids: Sequence[int]) -> dict[int, Reference]:
        """The references of ``ids``: from memory, else from the store, else generated
        (one greedy ``generate`` call per batch of missing documents) and stored."""
        ids = [int(i) for i in ids]
        texts = {i: self.prompt(i) for i in ids if i not in self._references}
        if texts and self._table is not None:
            found = self._table.load(self.model_id, self.task, self._reference_key(), list(texts))
            for i, ref in found.items():
                if ref.prompt_sha == prompt_sha(texts[i]):
                    self._references[i] = ref
        missing = [i for i in ids if i not in self._references]
        if missing:
            new = self._generate({i: texts[i] for i in missing})
            self._references.update(new)
            if self._table is not None:
                self._table.save(
                    self.model_id, self.task, self._reference_key(), list(new.values())
                )
        return {i: self._references[i] for i in ids}

    def _eos_ids(self) -> set[int]:
        out = set()
        if self.tokenizer.eos_token_id is not None:
            out.add(int(self.tokenizer.eos_token_id))
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if isinstance(eos, int):
            out.add(eos)
        elif isinstance(eos, (list, tuple)):
            out.update(int(e) for e in eos)
        return out

    def _generate(self, texts: dict[int, str]) -> dict[int, Reference]:
        import torch

        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = self.model
        device = next(model.parameters()).device
        eos = self._eos_ids()
        ids = sorted(texts, key=lambda i: (len(texts[i]), i))
        out: dict[int, Reference] = {}
        side = tok.padding_side
        with self._bar("generating dense references", len(ids)) as advance:
            for first in range(0, len(ids), self.batch_size):
                chunk = ids[first : first + self.batch_size]
                prompts = [list(tok(texts[i])["input_ids"]) for i in chunk]
                if min(len(p) for p in prompts) < 1:
                    raise TaskError("a prompt tokenizes to nothing")
                # left-padded generation, as generation.generate does
                width = max(len(p) for p in prompts)
                batch = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros(len(chunk), width, dtype=torch.long)
                for b, p in enumerate(prompts):
                    batch[b, width - len(p) :] = torch.tensor(p)
                    mask[b, width - len(p) :] = 1
                try:
                    tok.padding_side = "left"
                    with torch.no_grad():
                        gen = model.generate(
                            input_ids=batch.to(device),
                            attention_mask=mask.to(device),
                            max_new_tokens=self.max_new_tokens,
                            min_new_tokens=self.min_new_tokens,
                            do_sample=False,
                            num_beams=1,
                            pad_token_id=tok.pad_token_id,
                        )
                finally:
                    tok.padding_side = side
                self.generate_calls += 1
                conts = []
                for row in gen[:, width:].tolist():
                    cont = []
                    for t in row:
                        cont.append(int(t))
                        if t in eos:
                            break
                    conts.append(cont or [int(tok.eos_token_id or 0)])
                # the stored dense distributions come from the same teacher-forced pass
                # a trial makes, so keep 1.0 reproduces them
                with torch.no_grad():
                    means, tops, _ = score_batch(
                        model, list(zip(prompts, conts, strict=True)), None, top_k=self.top_k
                    )
                for i, p, c, m, (top_ids, top_lp) in zip(
                    chunk, prompts, conts, means, tops, strict=True
                ):
                    out[i] = Reference(
                        doc_id=i,
                        prompt_sha=prompt_sha(texts[i]),
                        prompt_ids=tuple(p),
                        continuation=tuple(c),
                        top_ids=top_ids.astype(np.int64),
                        top_logprobs=top_lp.astype(np.float32),
                        dense_fidelity=m,
                    )
                advance(len(chunk))
        return out

    @contextlib.contextmanager
    def _bar(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        if not self.progress or total == 0:
            yield lambda n: None
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        with Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            console=Console(stderr=True),
            transient=True,
        ) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n: bar.advance(task, n)

    # -- evaluation ----------------------------------------------------------------
    def _settings(self, ids: Sequence[int]) -> dict[str, Any]:
        return {
            "objective": "fidelity",
            "ids": [int(i) for i in ids],
            "seed": self.seed,
            "num_fewshot": self.shots,
            "batch_size": self.batch_size,
            "metric": self.metric,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "top_k": self.top_k,
            "dtype": self.dtype,
        }

    def run(self, method: Method, ids: Sequence[int]) -> EvalResult:
        """Score ``method`` on the references of ``ids`` (sorted, duplicates dropped);
        ``sample_scores`` follow ``sample_ids``. ``seconds`` counts the scoring only;
        generating missing references is reported as ``metrics["reference_seconds"]``."""

        ids = sorted({int(i) for i in ids})
        if not ids:
            raise ConfigError("no documents to evaluate")
        settings = self._settings(ids)
        if self.store is not None:
            hit = self.store.find(self.model_id, self.task, method, settings)
            if hit is not None:
                return hit.result()
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
            "fidelity": _mean(fid),
            "kl": _mean(kl),
            "neg_kl": -_mean(kl),
            "dense_fidelity": _mean(dense_fid),
            "tokens": _mean([len(refs[i].continuation) for i in ids]),
            "reference_seconds": reference_seconds,
        }
        from autosparse.tasks.evaluation import versions

        result = EvalResult(
            model=self.model_id,
            task=self.task,
            method=method.to_dict(),
            metric=self.metric,
            score=_mean(per_sample),
            metrics=metrics,
            sample_ids=ids,
            sample_scores=per_sample,
            density=_mean(densities) if densities else None,
            layer_density=self._layer_density,
            seconds=seconds,
            settings=settings,
            versions=versions(),
        )
        if self.store is not None:
            self.store.save(result)
        return result

    def _score(self, method: Method, refs: Sequence[Reference]) -> list[Scored]:
        import torch

        cached = self.prompt_cache_bytes > 0
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
        # the prompts run dense, before the method's patch is on
        prompts = (
            [self._prompts_of(method, [refs[j] for j in c], pad) for c in chunks] if cached else []
        )
        results: dict[int, Scored] = {}
        self._layer_density = None
        with method.apply(self.model) as engine, torch.no_grad():
            for n, chunk in enumerate(chunks):
                batch_refs = [refs[j] for j in chunk]
                seen = engine.kept_counts().shape[0] if engine is not None else 0
                if cached:
                    means, kls = _score_continuations(self.model, engine, prompts[n], batch_refs)
                else:
                    means, _, kls = score_batch(
                        self.model,
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
        cache or run now."""
        from autosparse.engine.prompts import run_prompts

        key = (tuple(r.doc_id for r in refs), method.token_ratio, repr(method.layers))
        batch = self._prompt_batches.get(key)
        if batch is None:
            batch = run_prompts(
                self.model,
                [r.prompt_ids for r in refs],
                token_ratio=method.token_ratio,
                layers=method.layers,
                pad_id=pad,
            )
            self.prompt_runs += 1
            self._prompt_batches[key] = batch
            total = sum(b.nbytes for b in self._prompt_batches.values())
            for old in list(self._prompt_batches)[:-1]:  # least recently used first
                if total <= self.prompt_cache_bytes:
                    break
                total -= self._prompt_batches.pop(old).nbytes
        self._prompt_batches.move_to_end(key)
        return batch


def _score_continuations(model, engine, prompts, refs: Sequence[Reference]):
    """(mean log-likelihood, (C,) KL) per reference, continuing its prompt run once."""
    import torch

    from autosparse.engine.prompts import continue_prompts

    device = prompts.first.device
    rows = continue_prompts(model, prompts, [r.continuation for r in refs], engine)
    means, kls = [], []
    for lp, ref in zip(rows, refs, strict=True):
        target = torch.tensor(list(ref.continuation), dtype=torch.long, device=device)
        means.append(float(lp.gather(-1, target.unsqueeze(-1)).mean()))
        kls.append(
            topk_kl(
                torch.as_tensor(ref.top_logprobs, device=device),
                torch.as_tensor(ref.top_ids, device=device),
                lp,
            )
        )
    return means, kls


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")
