"""The selection math against an independent, loop-based reading of docs/method.md."""

from __future__ import annotations

import math

import pytest
import torch

from autosparse.engine.selection import (
    keep_count,
    select_core_neurons,
    token_quota,
    vote_statistics,
)


def plain_core_neurons(acts: torch.Tensor, keep: float, token_ratio: float) -> list[int]:
    """method.md, CoreInfer steps 1-5, for one sequence (T x N), written with plain loops."""
    t_len, n = acts.shape
    rows = acts.tolist()
    positives = sum(1 for row in rows for v in row if v > 0)
    quota = math.floor(token_ratio * positives / t_len)
    votes = [0] * n
    mass = [0.0] * n
    for row in rows:
        ranked = sorted(range(n), key=lambda i: -row[i])[:quota]
        for i in ranked:
            votes[i] += 1
        for i, v in enumerate(row):
            mass[i] += max(v, 0.0)
    voted = [i for i in range(n) if votes[i] > 0]
    voted.sort(key=lambda i: (-votes[i], -mass[i], i))
    return voted[: math.floor(round(keep * n, 6))]


def silu_like(t: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=g)
    return x * torch.sigmoid(x) * torch.randn(t, n, generator=g)


def relu_like(t: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, n, generator=g) - 0.8  # mostly negative: few positives per token


@pytest.mark.parametrize("make", [silu_like, relu_like])
@pytest.mark.parametrize("keep", [0.1, 0.37, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_matches_plain_implementation(make, keep, seed):
    acts = make(9, 48, seed)
    sel = select_core_neurons(acts.unsqueeze(0), torch.ones(1, 9, dtype=torch.bool), keep, 0.2)
    assert sel.ids(0).tolist() == plain_core_neurons(acts, keep, 0.2)


def test_padding_never_counts():
    a, b = silu_like(7, 40, 3), silu_like(4, 40, 4)
    batch = torch.full((2, 7, 40), 1e3)  # huge padding values would dominate if counted
    batch[0] = a
    batch[1, 3:] = b  # left-padded row
    valid = torch.zeros(2, 7, dtype=torch.bool)
    valid[0] = True
    valid[1, 3:] = True
    sel = select_core_neurons(batch, valid, 0.3, 0.2)
    assert sel.ids(0).tolist() == plain_core_neurons(a, 0.3, 0.2)
    assert sel.ids(1).tolist() == plain_core_neurons(b, 0.3, 0.2)


def test_ties_are_deterministic_by_mass_then_id():
    # Every token votes for neurons 0..3 (quota 4); neuron masses differ only for 2 and 3.
    acts = torch.tensor([[5.0, 5.0, 4.0, 6.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]] * 2)
    acts = torch.cat([acts, torch.tensor([[5.0, 5.0, 6.0, 4.0] + [-1.0] * 6])])
    acts[:, 4:] = -1.0
    # P = 12 positives over 3 tokens, ratio 1.0 -> quota 4; all of 0..3 get 3 votes.
    sel = select_core_neurons(acts.unsqueeze(0), torch.ones(1, 3, dtype=torch.bool), 0.3, 1.0)
    # masses: n0=15, n1=15, n2=14, n3=16 -> 3, then 0 before 1 (lower id), then 2 (floor(3)=3 kept)
    assert sel.ids(0).tolist() == [3, 0, 1]


def test_larger_ratio_keeps_a_superset():
    acts = silu_like(16, 64, 7).unsqueeze(0)
    valid = torch.ones(1, 16, dtype=torch.bool)
    previous: set[int] = set()
    for keep in (0.05, 0.1, 0.2, 0.4, 0.8):
        ids = select_core_neurons(acts, valid, keep, 0.2).ids(0).tolist()
        assert len(ids) == len(set(ids))  # unique
        assert previous <= set(ids)
        previous = set(ids)


def test_kept_count_and_mask_agree():
    acts = silu_like(12, 50, 5).unsqueeze(0).repeat(3, 1, 1)
    valid = torch.ones(3, 12, dtype=torch.bool)
    sel = select_core_neurons(acts, valid, torch.tensor([0.1, 0.5, 1.0]), 0.5)
    voted = len(plain_core_neurons(acts[0], 1.0, 0.5))
    assert sel.kept.tolist() == [5, min(25, voted), voted]
    assert sel.mask.sum(dim=1).tolist() == sel.kept.tolist()
    for b in range(3):
        assert sel.mask[b, sel.ids(b)].all()


def test_relu_model_can_keep_fewer_than_asked():
    acts = relu_like(4, 100, 0).unsqueeze(0)
    sel = select_core_neurons(acts, torch.ones(1, 4, dtype=torch.bool), 0.9, 0.2)
    assert int(sel.kept[0]) < keep_count(0.9, 100)


def test_quota_and_empty_sequences():
    acts = torch.tensor([[[1.0, 2.0, -1.0], [3.0, -2.0, -1.0]]])
    assert token_quota(acts, torch.ones(1, 2, dtype=torch.bool), 1.0).tolist() == [1]
    empty = select_core_neurons(acts, torch.zeros(1, 2, dtype=torch.bool), 0.5, 0.2)
    assert empty.kept.tolist() == [0]


def votes_from_ranked_top_k(acts, valid, token_ratio):
    """Votes as each token's quota-long prefix of its sorted top-k list, the quota
    counted over a (B, T, N) mask, the mass multiplied by the mask: the straightforward
    form that vote_statistics' shortcuts must reproduce exactly, ties included."""
    bsz, _, n = acts.shape
    positives = ((acts > 0) & valid.unsqueeze(-1)).sum(dim=(1, 2)).double()
    tokens = valid.sum(dim=1).double()
    quota = torch.floor(token_ratio * positives / tokens.clamp(min=1))
    quota = torch.where(tokens > 0, quota, torch.zeros_like(quota)).long()
    votes = torch.zeros(bsz, n, dtype=torch.int32)
    k = min(int(quota.max()), n)
    if k > 0:
        top = acts.topk(k, dim=-1, sorted=True).indices
        counted = (torch.arange(k).view(1, 1, -1) < quota.view(-1, 1, 1)) & valid.unsqueeze(-1)
        votes.scatter_add_(1, top.reshape(bsz, -1), counted.reshape(bsz, -1).to(torch.int32))
    mass = (acts.float().clamp(min=0) * valid.unsqueeze(-1)).sum(dim=1)
    return quota, votes, mass


@pytest.mark.parametrize("n", [64, 1000])  # top-k's partial-sort and nth_element paths
@pytest.mark.parametrize("kind", ["levels", "relu"])
def test_votes_with_ties_equal_the_ranked_top_k(n, kind):
    """Few distinct values, so many tokens have ties across their quota boundary (and
    ReLU rows with fewer positives than the quota vote among exact zeros)."""
    g = torch.Generator().manual_seed(n)
    for trial in range(6):
        bsz, t_len = 3, 20
        if kind == "levels":
            acts = torch.randint(-3, 4, (bsz, t_len, n), generator=g).float()
        else:
            acts = torch.relu(torch.randn(bsz, t_len, n, generator=g) - 0.5)
        valid = torch.ones(bsz, t_len, dtype=torch.bool)
        if trial % 2:  # padding: sequences of different lengths, hence different quotas
            valid[1, :7] = False
            valid[2, :15] = False
            acts[2, 15:, ::2] = -1.0  # half the positives: a smaller quota
        for ratio in (0.2, 0.9):
            want_quota, want, want_mass = votes_from_ranked_top_k(acts, valid, ratio)
            if trial % 2:
                assert len(set(want_quota.tolist())) > 1
            votes, mass = vote_statistics(acts, valid, ratio)
            assert torch.equal(token_quota(acts, valid, ratio), want_quota)
            assert torch.equal(votes, want), (kind, n, trial, ratio)
            assert torch.equal(mass, want_mass)


@pytest.mark.parametrize(
    ("keep", "n", "expected"), [(0.58, 100, 58), (0.4, 1536, 614), (1.0, 7, 7), (0.29, 100, 29)]
)
def test_keep_count_is_a_robust_floor(keep, n, expected):
    assert keep_count(keep, n) == expected
