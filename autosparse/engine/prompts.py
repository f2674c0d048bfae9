"""Prompts run once, continued under any keep ratios.

Under CoreInfer-style sparsity a prompt always runs dense: its KV cache and its
activations, hence each layer's selection statistics (``selection.vote_statistics``,
or ``griffin_statistics`` under GRIFFIN's selector), do not depend on the keep ratios. Scoring fixed continuations of fixed prompts
under many methods (a screening study) can therefore run every prompt once:

    done = run_prompts(model, prompts, token_ratio=0.2, layers=None)   # dense, once
    with method.apply(model) as engine:                                # per method
        logprobs = continue_prompts(model, done, continuations, engine)

``continue_prompts`` selects each row's core neurons from the kept statistics
(``SparseEngine.preselect``) and runs only the continuation tokens, sparse, on the
kept cache. It gives what one pass over prompt + continuation under
``engine.scoring`` gives, up to floating-point summation order (tested).

Several continuations of one prompt (the choices of a multiple-choice question) share
its run: ``take_rows(done, [0, 0, 0, 1, 1])`` repeats each prompt's row once per
continuation, cache and statistics included, for one ``continue_prompts`` call.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from autosparse.errors import ConfigError


@dataclass(eq=False)
class PromptBatch:
    """A batch of prompts run dense: left-padded (``mask`` (B, P)), their KV cache,
    every sparse layer's ``(votes, mass)`` statistics for ``selector``, ``token_ratio``
    and ``layers``, and the log-probabilities (B, V) the last prompt position gives the
    first continuation token."""

    lengths: list[int]
    mask: torch.Tensor
    cache: Any
    statistics: list[tuple[torch.Tensor, torch.Tensor]]
    first: torch.Tensor
    token_ratio: float
    layers: tuple[int, ...]
    selector: str = "coreinfer"

    @property
    def nbytes(self) -> int:
        tensors = [t for pair in self.statistics for t in pair] + [self.first, self.mask]
        return sum(t.numel() * t.element_size() for t in tensors + _cache_tensors(self.cache))

    def matches(self, engine) -> bool:
        """Whether ``engine`` selects with this batch's selector, token ratio (CoreInfer's
        only) and layers."""
        if engine is None:
            return True
        if engine.selector != self.selector or tuple(engine.layers) != self.layers:
            return False
        return self.selector == "griffin" or engine.token_ratio == self.token_ratio


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    if hasattr(cache, "layers"):  # DynamicCache of recent transformers
        return [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    if hasattr(cache, "key_cache"):
        return list(cache.key_cache) + list(cache.value_cache)
    if isinstance(cache, (tuple, list)):
        return [t for pair in cache for t in pair if isinstance(t, torch.Tensor)]
    return []


def forward_accepts(model, name: str) -> bool:
    """Whether ``model.forward`` takes a keyword ``name`` (it differs by family and version)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def run_prompts(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    token_ratio: float = 0.2,
    layers=None,
    pad_id: int = 0,
    selector: str = "coreinfer",
) -> PromptBatch:
    """Run ``prompts`` (token ids) dense in one left-padded batch and keep what any
    later continuation needs (see the module docstring)."""
    from autosparse.engine.patch import SparseEngine

    if not prompts or min(len(p) for p in prompts) < 1:
        raise ConfigError("every prompt needs at least one token")
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[b, width - len(p) :] = 1
    kwargs: dict[str, Any] = {"attention_mask": mask, "use_cache": True}
    if forward_accepts(model, "position_ids"):
        kwargs["position_ids"] = _positions(mask)
    if forward_accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    # keep 1.0 runs every layer dense; collecting() keeps the selection statistics
    with SparseEngine(
        model, 1.0, token_ratio=token_ratio, layers=layers, selector=selector
    ) as engine:
        with engine.collecting() as statistics:
            out = model(input_ids=ids, **kwargs)
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)
    # the output's cache field is "cache" in recent transformers, "past_key_values" before
    cache = out["cache"] if "cache" in out else getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "get_seq_length"):
        raise ConfigError(f"{type(model).__name__} returned no KV cache object for its prompts")
    return PromptBatch(
        lengths=[len(p) for p in prompts],
        mask=mask,
        cache=cache,
        statistics=list(statistics),
        first=first,
        token_ratio=engine.token_ratio,
        layers=tuple(engine.layers),
        selector=engine.selector,
    )


def _restore(cache: Any, length: int) -> None:
    """Drop everything after the first ``length`` positions of a cache that a
    continuation extended."""
    grown = int(cache.get_seq_length()) - length
    if grown > 0:
        cache.crop(-grown)  # recent transformers: a negative count removes tokens
    if int(cache.get_seq_length()) != length:
        raise RuntimeError("the prompt cache could not be restored")


@torch.no_grad()
def continue_prompts(
    model,
    prompts: PromptBatch,
    continuations: Sequence[Sequence[int]],
    engine=None,
) -> list[torch.Tensor]:
    """Per row b, the (C_b, V) log-probabilities of the positions predicting
    ``continuations[b]``: the first from the prompt's last (dense) position, the rest
    from one pass over the continuation (its last token is never an input), sparse
    under ``engine`` (None: dense). The prompt cache is left as it was."""
    if len(continuations) != len(prompts.lengths):
        raise ConfigError(
            f"{len(continuations)} continuations for a batch of {len(prompts.lengths)} prompts"
        )
    if min(len(c) for c in continuations) < 1:
        raise ConfigError("every continuation needs at least one token")
    if not prompts.matches(engine):
        raise ConfigError("the prompts were run for another selector, token ratio or other layers")
    if engine is not None:
        engine.preselect(prompts.statistics)
    steps = max(len(c) for c in continuations) - 1
    rows = [prompts.first[b : b + 1] for b in range(len(continuations))]
    if steps > 0:
        device = prompts.mask.device
        # right-padded after each row's own tokens: under the causal mask the padding
        # changes no scored position
        ids = torch.zeros(len(continuations), steps, dtype=torch.long, device=device)
        for b, c in enumerate(continuations):
            ids[b, : len(c) - 1] = torch.tensor(list(c)[:-1], dtype=torch.long)
        mask = torch.cat([prompts.mask, torch.ones_like(ids)], dim=1)
        kwargs: dict[str, Any] = {"attention_mask": mask, "use_cache": True}
        if forward_accepts(model, "position_ids"):
            kwargs["position_ids"] = _positions(mask)[:, -steps:]
        cache = prompts.cache
        length = int(cache.get_seq_length())
        try:
            # the cache argument's name changed across transformers versions
            kwargs["cache" if forward_accepts(model, "cache") else "past_key_values"] = cache
            logits = model(input_ids=ids, **kwargs).logits
        finally:
            _restore(cache, length)
        for b, c in enumerate(continuations):
            if len(c) > 1:
                tail = F.log_softmax(logits[b, : len(c) - 1].float(), dim=-1)
                rows[b] = torch.cat([rows[b], tail])
    return rows


def _take_cache(cache: Any, index: torch.Tensor) -> Any:
    """A cache holding rows ``index`` of ``cache``; ``cache`` itself is left as it was."""
    if hasattr(cache, "layers"):  # DynamicCache: its layers re-bind, never write, their tensors
        out = copy.copy(cache)
        out.layers = [copy.copy(layer) for layer in cache.layers]
    else:
        out = copy.deepcopy(cache)
    out.batch_select_indices(index)
    return out


def take_rows(prompts: PromptBatch, rows: Sequence[int]) -> PromptBatch:
    """A PromptBatch whose row i is row ``rows[i]`` of ``prompts`` (rows may repeat: one row
    per continuation of a shared prompt). It has its own cache; ``prompts`` stays usable."""
    if not rows or min(rows) < 0 or max(rows) >= len(prompts.lengths):
        raise ConfigError(
            f"rows {list(rows)[:5]} are not rows of a batch of {len(prompts.lengths)}"
        )
    index = torch.tensor(list(rows), dtype=torch.long, device=prompts.mask.device)
    return PromptBatch(
        lengths=[prompts.lengths[r] for r in rows],
        mask=prompts.mask[index],
        cache=_take_cache(prompts.cache, index),
        statistics=[(v[index.to(v.device)], m[index.to(m.device)]) for v, m in prompts.statistics],
        first=prompts.first[index],
        token_ratio=prompts.token_ratio,
        layers=prompts.layers,
        selector=prompts.selector,
    )
