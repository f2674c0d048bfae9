"""The fidelity objective's math: a KL coarse-grained to the dense top-k tokens, and
teacher-forced scoring of continuations (one pass over prompt + continuation, or the
continuation alone on prompts run once)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from autosparse.engine.prompts import forward_accepts
from autosparse.errors import ConfigError
from autosparse.results import Reference


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
    kwargs = {"logits_to_keep": keep} if forward_accepts(model, "logits_to_keep") else {}
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


def score_continuations(model, engine, prompts, refs: Sequence[Reference]):
    """(mean log-likelihood, (C,) KL) per reference, continuing its prompt run once
    (``prompts``: an ``engine.prompts.PromptBatch`` of the references' prompts)."""
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
