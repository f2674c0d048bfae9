"""``SparseLM``: lm-eval's HFLM running a model under a sparsity Method.

Generation: lm-eval's batched ``generate`` (left-padded, ``batch_size`` requests of the
same generation settings per batch); the engine selects each row's core neurons at the
prefill and every generated token runs sparse. Each row stops at its own first stop
string or EOS (``stop_per_sequence``), so a batch gives what its rows give alone.

Log-likelihood: lm-eval scores an answer in one forward pass over prompt + answer
(right-padded). ``_loglikelihood_tokens`` is reimplemented here so that the engine
knows each row's prompt: the row ``(context + continuation)[:-1]`` has
``len(row) - len(continuation) + 1`` prompt positions (the last context token
predicts the first answer token and belongs to the prompt, like the last prefill token
in generation); those run dense and select; the remaining answer positions run sparse.
A one-token answer is therefore scored entirely by the prompt and does not change
with sparsity (exactly as the first generated token does not).

Since the prompt runs dense and selects from its own tokens only, requests with the
same prompt tokens (the choices of a multiple-choice question) share one run of it:
each distinct prompt runs once (``engine.prompts.run_prompts``) and every continuation
is scored from its KV cache and selection (``continue_prompts``). That gives the
scores of one pass per row up to floating-point summation order; ``shared_contexts=
False`` keeps the one-pass-per-row path (each row's prompt length handed to
``engine.scoring``).

Realized density is recorded per scored row (one per distinct prompt and continuation
input, as lm-eval's rows) and keyed by the request's context string, so callers can
attribute it to documents (``density_of``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator

from autosparse.errors import ConfigError
from autosparse.methods import Method

#: progress(kind, advance=None, total=None): kind is "loglikelihood" or "generate_until"
Progress = Callable[..., None]


class SparseLM(HFLM):
    """An HFLM over a loaded model. ``with lm.sparse(method):`` patches the model for the
    duration; outside it the model runs dense. Only causal LMs and integer batch sizes."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 1,
        max_length: int | None = None,
        progress: Progress | None = None,
        shared_contexts: bool = True,
        **kwargs: Any,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, not {batch_size!r}")
        super().__init__(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            backend="causal",
            **kwargs,
        )
        self.engine = None
        self.method: Method | None = None
        self.progress = progress
        #: context string -> realized densities of the rows run with that context
        self.context_density: dict[str, list[float]] = {}
        #: (rows, sparse layers) kept counts of every row run
        self._kept: list[torch.Tensor] = []
        self._pending_contexts: list[str] | None = None
        self._last_neurons = 1
        #: (context, continuation) -> token ids: a prepared screen asks the same
        #: requests in every trial, and tokenizing them is a per-request cost
        self._encoded: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        #: log-likelihood requests that share a prompt run it once (False: one forward
        #: pass per request row, lm-eval's way; the same scores, kept for comparison)
        self.shared_contexts = shared_contexts
        #: prompts run by the shared-context path (each distinct prompt once per call)
        self.prompt_runs = 0
        #: greedy generate_until requests decode through this path (``greedy_ids``'s
        #: decoders: "lean" or "hf", the same tokens); sampling always uses model.generate
        self.decoder = "lean"

    # -- the method -----------------------------------------------------------------
    @contextlib.contextmanager
    def sparse(self, method: Method) -> Iterator[SparseLM]:
        """Run every request inside the block under ``method`` (dense: no patch)."""
        with method.apply(self.model) as engine:
            self.engine, self.method = engine, method
            self.context_density, self._kept = {}, []
            try:
                yield self
            finally:
                self.engine = None

    def realized_density(self) -> float | None:
        """Mean realized density over every row run (None for dense)."""
        counts = self._kept_counts()
        if counts is None or not counts.shape[0]:
            return None
        return float(counts.sum(1).mean() / (counts.shape[1] * self._neurons()))

    def layer_density(self) -> list[float] | None:
        counts = self._kept_counts()
        if counts is None or not counts.shape[0]:
            return None
        return (counts.mean(0) / self._neurons()).tolist()

    def density_of(self, contexts: Sequence[str]) -> float | None:
        """Mean realized density of the rows run with these context strings."""
        values = [d for c in contexts for d in self.context_density.get(c, [])]
        return sum(values) / len(values) if values else None

    def _kept_counts(self) -> torch.Tensor | None:
        return torch.cat(self._kept).double() if self._kept else None

    def _neurons(self) -> int:
        return self.engine.num_neurons if self.engine is not None else self._last_neurons

    def _record(self, contexts: Sequence[str | None]) -> None:
        """File the kept counts of the prefill just run under the rows' contexts."""
        engine = self.engine
        if engine is None:
            return
        counts = engine.kept_counts()  # (rows, sparse layers)
        if counts.shape[0] != len(contexts):
            raise RuntimeError(
                f"the engine recorded {counts.shape[0]} sequences for a batch of {len(contexts)}"
            )
        self._last_neurons = engine.num_neurons
        self._kept.append(counts)
        for context, density in zip(contexts, engine.sequence_density().tolist(), strict=True):
            if context is not None:
                self.context_density.setdefault(context, []).append(density)
        engine.reset_records()

    def _tick(self, kind: str, advance: int = 0, total: int | None = None) -> None:
        if self.progress is not None:
            self.progress(kind, advance=advance, total=total)

    # -- generation -------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self._tick("generate_until", total=len(requests))
        return super().generate_until(
            requests, disable_tqdm=disable_tqdm or self.progress is not None
        )

    def tok_batch_encode(self, strings: list[str], *args: Any, **kwargs: Any):
        # generate_until encodes each batch right before generating it: remember the
        # strings so the prefill's densities can be filed under them
        self._pending_contexts = list(strings)
        return super().tok_batch_encode(strings, *args, **kwargs)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        contexts = self._pending_contexts
        self._pending_contexts = None
        if contexts is None or len(contexts) != context.shape[0]:
            contexts = [None] * context.shape[0]
        if self.engine is not None:
            self.engine.reset_records()
        # lm-eval's own criteria end a batch only once every row holds the same stop
        # string; these finish each row at its own first stop string (the decoder then
        # pads it) and end the batch when every row has finished
        kwargs = dict(generation_kwargs)
        temperature = kwargs.pop("temperature", 0.0)
        if temperature == 0.0 and kwargs.get("do_sample") is None:
            kwargs["do_sample"] = False
        if not (kwargs.get("do_sample") is False and temperature == 0.0):
            kwargs["temperature"] = temperature
        criteria = stop_per_sequence(self.tokenizer, stop, context.shape[1])
        mask = kwargs.pop("attention_mask", None)
        with torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            if self._lean_decodes(kwargs, max_length - context.shape[1]):
                from autosparse.decoding import eos_ids, lean_greedy

                new = lean_greedy(
                    self.model,
                    context,
                    mask,
                    max_new_tokens=max_length - context.shape[1],
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=eos_ids(self.model),
                    stop=lambda sequences: criteria(sequences, None),
                )
                out = torch.cat([context, new], dim=1)
            else:
                if mask is not None:
                    kwargs["attention_mask"] = mask
                out = self.model.generate(
                    input_ids=context,
                    max_length=max_length,
                    stopping_criteria=criteria,
                    pad_token_id=self.tokenizer.pad_token_id,
                    use_cache=True,
                    **kwargs,
                )
        self._record(contexts)
        self._tick("generate_until", advance=context.shape[0])
        return out

    def _lean_decodes(self, kwargs: dict[str, Any], new_tokens: int) -> bool:
        """Whether a generate_until call with these generate() arguments (temperature
        already resolved) is plain greedy decoding the lean path reproduces."""
        from autosparse.generation import resolve_decoder

        return (
            kwargs == {"do_sample": False}
            and new_tokens >= 1
            and resolve_decoder(self.model, self.decoder) == "lean"
        )

    # -- log-likelihood ---------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        key = (context, continuation)
        encoded = self._encoded.get(key)
        if encoded is None:
            encoded = self._encoded[key] = super()._encode_pair(context, continuation)
        return encoded

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._tick("loglikelihood", total=len(requests))
        return super().loglikelihood(
            requests, disable_tqdm=disable_tqdm or self.progress is not None
        )

    def _scoring(self, prompt_lengths: list[int]):
        if self.engine is None:
            return contextlib.nullcontext()
        self.engine.reset_records()
        return self.engine.scoring(prompt_lengths)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """(log P(continuation | context), continuation is the greedy output) per request.
        Requests whose prompts agree share one run of it (``shared_contexts``); otherwise,
        or for a continuation that fills the whole window, one pass per row as lm-eval."""
        if self.backend != "causal":
            raise ConfigError("sparse log-likelihood scoring supports causal LMs only")
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ConfigError("a log-likelihood request has an empty context or answer")
        size = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 1)
        max_length = self.max_length  # a property that resolves the config on every read
        if not self.shared_contexts:
            return self._per_request_tokens(requests, size, max_length)
        prompts = [_prompt_of(context, cont, max_length) for _, context, cont in requests]
        alone = [i for i, p in enumerate(prompts) if not p]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        if alone:
            for i, answer in zip(
                alone,
                self._per_request_tokens([requests[i] for i in alone], size, max_length),
                strict=True,
            ):
                results[i] = answer
        shared = [i for i, p in enumerate(prompts) if p]
        if shared:
            for i, answer in zip(
                shared,
                self._shared_context_tokens(
                    [requests[i] for i in shared], [prompts[i] for i in shared], size
                ),
                strict=True,
            ):
                results[i] = answer
        return results  # type: ignore[return-value]

    def _shared_context_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        prompts: list[tuple[int, ...]],
        size: int,
    ) -> list[tuple[float, bool]]:
        """Run every distinct prompt once (dense, ``engine.prompts.run_prompts``, up to
        ``size`` prompts per left-padded batch) and score all its continuations from its
        cache and selection (``continue_prompts``), as one pass per row would."""
        from autosparse.engine.prompts import continue_prompts, run_prompts, take_rows

        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_prompt.setdefault(prompt, []).append(i)
        # longest first (lm-eval's order), so a batch's prompts have similar lengths
        order = sorted(by_prompt, key=lambda p: (-len(p), p))
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else int(pad)
        engine = self.engine
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for first in range(0, len(order), size):
            chunk = order[first : first + size]
            if engine is None:
                done = run_prompts(self.model, chunk, pad_id=pad)
            else:
                with engine.paused():
                    done = run_prompts(
                        self.model,
                        chunk,
                        token_ratio=engine.token_ratio,
                        layers=engine.layers,
                        pad_id=pad,
                        selector=engine.selector,
                    )
                engine.reset_records()
            self.prompt_runs += len(chunk)
            # one continuation row per distinct (prompt, continuation input): one-token
            # answers to a prompt share its row, as in lm-eval's one pass per row
            row_of: dict[tuple[int, tuple[int, ...]], int] = {}
            rows, continuations, contexts = [], [], []
            for b, prompt in enumerate(chunk):
                for i in by_prompt[prompt]:
                    request, _, continuation = requests[i]
                    key = (b, tuple(continuation[:-1]))
                    if key not in row_of:
                        row_of[key] = len(rows)
                        rows.append(b)
                        continuations.append(continuation)
                        contexts.append(None if request is None else request[0])
            logprobs: list[torch.Tensor | None] = [None] * len(rows)
            recorded = []
            # rows of one continuation length per pass: no padded positions; a one-token
            # answer is scored by the prompt's last position alone (no pass)
            by_length: dict[int, list[int]] = {}
            for r, continuation in enumerate(continuations):
                by_length.setdefault(len(continuation), []).append(r)
            for length, bucket in sorted(by_length.items()):
                picked = [rows[r] for r in bucket]
                if length == 1:
                    if engine is not None:  # selects and records, as a prefill would
                        index = torch.tensor(picked, dtype=torch.long)
                        engine.preselect(
                            [
                                (v[index.to(v.device)], m[index.to(m.device)])
                                for v, m in done.statistics
                            ]
                        )
                    scored = [done.first[b : b + 1] for b in picked]
                else:
                    scored = continue_prompts(
                        self.model,
                        take_rows(done, picked),
                        [continuations[r] for r in bucket],
                        engine,
                    )
                for r, lp in zip(bucket, scored, strict=True):
                    logprobs[r] = lp
                recorded += [contexts[r] for r in bucket]
            self._record(recorded)
            for b, prompt in enumerate(chunk):
                for i in by_prompt[prompt]:
                    request, _, continuation = requests[i]
                    scored = logprobs[row_of[(b, tuple(continuation[:-1]))]]  # (C, V)
                    target = torch.tensor(continuation, dtype=torch.long, device=scored.device)
                    logp = float(scored.gather(1, target[:, None]).sum())
                    is_greedy = scored.argmax(dim=-1).tolist() == list(continuation)
                    results[i] = answer = (logp, is_greedy)
                    if request is not None:
                        self.cache_hook.add_partial("loglikelihood", request, answer)
                    self._tick("loglikelihood", advance=1)
        return results  # type: ignore[return-value]

    def _per_request_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        size: int,
        max_length: int,
    ) -> list[tuple[float, bool]]:
        """One forward pass over (context + continuation)[:-1] per row, computed as lm-eval
        does, with each row's prompt length handed to the engine (``engine.scoring``)."""
        # Longest first, as lm-eval does; requests whose context + continuation[:-1]
        # agree (one-token answers to one prompt) share one forward row.
        collator = Collator(
            requests,
            sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
            group_by="contexts" if self.logits_cache else None,
            group_fn=lambda r: r[-2] + r[-1][:-1],
        )
        results: list[tuple[float, bool]] = []
        for chunk in collator.get_batched(n=size):
            windows, prompt_lengths = [], []
            for _, context, continuation in chunk:
                window = (context + continuation)[-(max_length + 1) :][:-1]
                windows.append(window)
                prompt_lengths.append(len(window) - len(continuation) + 1)
            width = max(len(w) for w in windows)
            # right-padded with token 0 like lm-eval; padding only follows a row's own
            # tokens, so under a causal mask it changes none of the scored positions
            batch = torch.tensor(
                [w + [0] * (width - len(w)) for w in windows], dtype=torch.long, device=self.device
            )
            with self._scoring(prompt_lengths):
                logits = self._model_call(batch)  # (B, width, vocab)
            self._record([None if req is None else req[0] for req, _, _ in chunk])

            # Only the answer positions are scored: gather them from every row at once and
            # normalize those alone (the vocabulary is large, the prompts are long).
            rows_at, positions, answers = [], [], []
            for b, (window, (_, _, continuation)) in enumerate(zip(windows, chunk, strict=True)):
                rows_at += [b] * len(continuation)
                positions += range(len(window) - len(continuation), len(window))
                answers += continuation
            scored = F.log_softmax(
                logits[rows_at, positions], dim=-1, dtype=self.softmax_dtype
            )  # (answer tokens, vocab)
            target = torch.tensor(answers, dtype=torch.long, device=self.device)
            token_logp = scored.gather(1, target[:, None])[:, 0].tolist()
            greedy = scored.argmax(dim=-1).tolist()

            start = 0
            for request, context, continuation in chunk:
                stop = start + len(continuation)
                span = scored[start:stop].unsqueeze(0)  # (1, C, V)
                for req, cont, _ in collator.get_cache(
                    req_str=request, cxt_toks=context, cont_toks=continuation, logits=span
                ):
                    if list(cont) == list(continuation):
                        logp = sum(token_logp[start:stop])
                        is_greedy = greedy[start:stop] == list(cont)
                    else:  # a one-token answer sharing this row with another request
                        picked = torch.tensor(cont, dtype=torch.long, device=self.device)
                        tail = scored[stop - len(cont) : stop]
                        logp = float(tail.gather(1, picked[:, None]).sum())
                        is_greedy = greedy[stop - len(cont) : stop] == list(cont)
                    answer = (float(logp), bool(is_greedy))
                    results.append(answer)
                    if req is not None:
                        self.cache_hook.add_partial("loglikelihood", req, answer)
                    self._tick("loglikelihood", advance=1)
                start = stop
        return collator.get_original(results)


def _prompt_of(context: list[int], continuation: list[int], max_length: int) -> tuple[int, ...]:
    """The prompt tokens of a request's row ``(context + continuation)[:-1]``, cut to the
    model's window as lm-eval cuts it: every position before the one that predicts the
    first continuation token. Empty when the continuation fills the whole window."""
    window = (context + continuation)[-(max_length + 1) :][:-1]
    length = len(window) - len(continuation) + 1
    return tuple(window[:length]) if length > 0 else ()


def stop_per_sequence(tokenizer, stops: Sequence[str], prompt_width: int):
    """Stopping criteria (a transformers ``StoppingCriteriaList``) that finish each row of a
    batch once its generated tokens (after ``prompt_width``) hold any of ``stops``. Like
    lm-eval's criteria, each stop string is looked for in the decoded last
    ``len(tokens of the string) + 2`` tokens, so a row stops where it stops alone."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    lookback = {s: len(tokenizer.encode(s, add_special_tokens=False)) + 2 for s in stops if s}

    class StopStrings(StoppingCriteria):
        def __init__(self) -> None:
            self.done: torch.Tensor | None = None  # (B,) bool

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            if self.done is None:
                self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            new = input_ids[:, prompt_width:]
            rows = [b for b in range(new.shape[0]) if not self.done[b]]
            for stop, n in lookback.items():
                if not rows:
                    break
                texts = tokenizer.batch_decode(new[rows, -n:])
                for b, text in zip(rows, texts, strict=True):
                    if stop in text:
                        self.done[b] = True
                rows = [b for b in rows if not self.done[b]]
            return self.done.to(input_ids.device).clone()

    return StoppingCriteriaList([StopStrings()])
