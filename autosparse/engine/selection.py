"""Sentence-level core-neuron selection (CoreInfer), as pure tensor functions.

The rule, per sequence and sparse layer (docs/method.md):

1. ``P`` = positive entries of the prompt activations ``A`` (T x N), padding excluded;
   per-token quota ``m = floor(q * P / T)``.
2. Every prompt token votes for the ids of its ``m`` largest activations.
3. Neurons with at least one vote are ranked by vote count, descending. Ties go
   to the larger summed positive activation, then to the lower neuron id
   (the reference used an unstable sort; this order is deterministic).
4. The first ``keep_count(r, N)`` of the ranking are kept; if fewer neurons
   received votes, all of them are kept.

GRIFFIN's rule (``griffin_statistics``) gives statistics of the same shape that rank
through the same ``rank_selection``: every neuron is eligible, ranked by the L2 norm of
its column of the token-normalized activations, so it always keeps ``keep_count(r, N)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def keep_count(keep: float, n: int) -> int:
    """``floor(keep * n)``, robust to binary rounding (0.58 * 100 is 57.999...)."""
    return int(math.floor(round(keep * n, 6)))


@dataclass(frozen=True)
class Selection:
    """Core neurons of a batch for one layer.

    ``order`` (B, N) ranks all neurons; the first ``kept[b]`` entries of row b are
    that sequence's core neurons. ``mask`` (B, N) is True for kept neurons.
    """

    order: torch.Tensor
    kept: torch.Tensor
    mask: torch.Tensor

    def ids(self, b: int) -> torch.Tensor:
        return self.order[b, : int(self.kept[b])]


def token_quota(acts: torch.Tensor, valid: torch.Tensor, token_ratio: float) -> torch.Tensor:
    """Per-sequence quota ``m = floor(q * P / T)``. acts (B, T, N), valid (B, T) bool -> (B,) long."""
    # per-token counts first: an int32 (B, T) sum, then only the counted tokens
    positives = ((acts > 0).sum(dim=2, dtype=torch.int32) * valid).sum(dim=1).double()  # (B,)
    tokens = valid.sum(dim=1).double()  # (B,)
    quota = torch.floor(token_ratio * positives / tokens.clamp(min=1))
    return torch.where(tokens > 0, quota, torch.zeros_like(quota)).long()


def vote_statistics(
    acts: torch.Tensor, valid: torch.Tensor, token_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-2 of the rule and the tie-break key: ``(votes, mass)``, both (B, N).

    votes (int32): how many counted prompt tokens have the neuron among their quota of
    largest activations. mass (float32): the neuron's summed positive activation over
    those tokens. Everything the ranking needs; a fixed prompt's statistics can be kept
    and ranked again for any keep ratio (``rank_selection``)."""
    bsz, _, n = acts.shape
    device = acts.device
    quota = token_quota(acts, valid, token_ratio)  # (B,)
    max_quota = int(quota.max()) if bsz else 0

    votes = torch.zeros(bsz, n, dtype=torch.int32, device=device)
    if max_quota > 0:
        k = min(max_quota, n)
        # Only the set of a token's k largest counts, unless a sequence with a smaller
        # quota counts a prefix of the ranked list. The CPU kernel's unsorted top-k is the
        # same partition (nth_element) without the sort of the k that follows it, so the
        # same indices, ties included; other devices keep the sorted call.
        prefix = bool(((quota > 0) & (quota < k)).any())
        ranked = prefix or device.type != "cpu"
        top = acts.topk(k, dim=-1, sorted=ranked).indices  # (B, T, M)
        rank = torch.arange(top.shape[-1], device=device)
        counted = (rank.view(1, 1, -1) < quota.view(-1, 1, 1)) & valid.unsqueeze(-1)  # (B, T, M)
        votes.scatter_add_(1, top.reshape(bsz, -1), counted.reshape(bsz, -1).to(torch.int32))

    # Tie-break key: summed positive activation over the counted tokens, in float32.
    positive = acts.float().clamp(min=0)
    if not bool(valid.all()):  # x * 1 is x, so a prompt without padding skips the product
        positive = positive * valid.unsqueeze(-1)
    mass = positive.sum(dim=1)  # (B, N)
    return votes, mass


def rank_selection(
    votes: torch.Tensor, mass: torch.Tensor, keep: torch.Tensor | float
) -> Selection:
    """Steps 3-4: rank by (votes desc, mass desc, id asc) and keep the first
    ``keep_count(keep, N)`` neurons that received votes. keep: a float or a (B,) tensor."""
    bsz, n = votes.shape
    device = votes.device
    # Two stable sorts give (votes desc, mass desc, id asc).
    by_mass = mass.argsort(dim=1, descending=True, stable=True)
    by_votes = votes.gather(1, by_mass).argsort(dim=1, descending=True, stable=True)
    order = by_mass.gather(1, by_votes)  # (B, N)

    if isinstance(keep, torch.Tensor):
        wanted = torch.tensor([keep_count(float(k), n) for k in keep.tolist()], device=device)
    else:
        wanted = torch.full((bsz,), keep_count(float(keep), n), device=device)
    kept = torch.minimum(wanted, (votes > 0).sum(dim=1)).long()  # (B,)

    in_rank = torch.arange(n, device=device).unsqueeze(0) < kept.unsqueeze(1)  # (B, N)
    mask = torch.zeros(bsz, n, dtype=torch.bool, device=device).scatter_(1, order, in_rank)
    return Selection(order=order, kept=kept, mask=mask)


def griffin_statistics(
    acts: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRIFFIN's statistics in ``rank_selection``'s form: ``(votes, score)``, both (B, N).

    acts: (B, T, N) inputs of the down projection. Each counted token's row is divided
    by its L2 norm (a zero row stays zero: it contributes nothing); a neuron's score is
    the L2 norm of its column over the counted tokens (float32). votes is all ones, so
    every neuron is eligible and the ranking is (score desc, id asc)."""
    bsz, _, n = acts.shape
    a = torch.where(valid.unsqueeze(-1), acts.float(), 0.0)  # (B, T, N), uncounted zeroed
    norms = torch.linalg.vector_norm(a, dim=-1, keepdim=True)  # (B, T, 1)
    a = torch.where(norms > 0, a / norms.clamp(min=torch.finfo(a.dtype).tiny), 0.0)
    score = torch.linalg.vector_norm(a, dim=1)  # (B, N)
    votes = torch.ones(bsz, n, dtype=torch.int32, device=acts.device)
    return votes, score


def selection_statistics(
    selector: str, acts: torch.Tensor, valid: torch.Tensor, token_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics ``selector`` ranks by: ``vote_statistics`` for "coreinfer" (uses
    ``token_ratio``), ``griffin_statistics`` for "griffin" (ignores it)."""
    if selector == "griffin":
        return griffin_statistics(acts, valid)
    if selector == "coreinfer":
        return vote_statistics(acts, valid, token_ratio)
    raise ValueError(f"unknown selector {selector!r}")


def select_core_neurons(
    acts: torch.Tensor,
    valid: torch.Tensor,
    keep: torch.Tensor | float,
    token_ratio: float,
    selector: str = "coreinfer",
) -> Selection:
    """Select each sequence's core neurons from its prompt activations.

    acts: (B, T, N) activations of one layer. valid: (B, T) bool, True for the prompt
    tokens that count (padding and continuation tokens are False). keep: the layer's
    keep ratio (a float, or a (B,) tensor). selector: "coreinfer" (votes, ``token_ratio``)
    or "griffin" (column norms; acts must then be the down projection's input).
    Vectorized over the batch.
    """
    votes, mass = selection_statistics(selector, acts, valid, token_ratio)
    return rank_selection(votes, mass, keep)
