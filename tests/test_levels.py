"""The levels method against a plain implementation of docs/method.md, its edge cases,
goal solving, level files and AVG. Synthetic statistics only: no model runs here."""

from __future__ import annotations

import json
import math
from decimal import ROUND_HALF_EVEN, Decimal

import numpy as np
import pytest

from autosparse.errors import ConfigError
from autosparse.levels import (
    LevelsIndex,
    LevelsResult,
    average_levels,
    levels_direct,
    prompt_level_table,
    read_levels_file,
    write_levels_file,
)

# --------------------------------------------------------------------------- plain


def plain_stats(acts):
    """S and c of method.md by loops. acts: list over prompts of (L, T, N) arrays."""
    out_s, out_c = [], []
    for a in acts:
        n_layers, n_tokens, n = a.shape
        S = np.zeros((n_layers, n), dtype=np.float32)
        c = np.zeros((n_layers, n), dtype=np.int64)
        for layer in range(n_layers):
            for i in range(n):
                total = np.float32(0)
                for t in range(n_tokens):
                    x = a[layer, t, i]
                    if x > 0:
                        total = np.float32(total + np.float32(x))
                        c[layer, i] += 1
                S[layer, i] = total
        out_s.append(S)
        out_c.append(c)
    return np.stack(out_s), np.stack(out_c)


def plain_counts(S, c, w_sum, w_count, theta, top_k):
    """#{i : score_i > theta} per prompt and layer, from method.md with the documented
    rules for zero denominators and top_k > N."""
    n_prompts, n_layers, n = S.shape
    out = np.zeros((n_prompts, n_layers), dtype=np.int64)
    for p in range(n_prompts):
        for layer in range(n_layers):
            sums = [float(x) for x in S[p, layer]]
            counts = [int(x) for x in c[p, layer]]
            s_k = sorted(sums, reverse=True)[min(top_k, n) - 1]
            c_max = max(counts)
            kept = 0
            for i in range(n):
                if s_k > 0:
                    s = sums[i] / s_k
                else:
                    s = math.inf if sums[i] > 0 else 0.0
                norm = counts[i] / c_max if c_max > 0 else 0.0
                score = (w_sum * s if w_sum > 0 else 0.0) + w_count * norm
                if score > theta:
                    kept += 1
            out[p, layer] = kept
    return out


def reference_layer_level(per_prompt):
    """The reference's layer level, ``round(sum(levels) / len(levels), 2)``, as it ran on
    Python 3.11: float64 additions from the first prompt to the last. A loop, because
    Python 3.12's sum() of floats compensates rounding errors and would differ."""
    total = 0
    for x in per_prompt:
        total = total + x
    return round(total / len(per_prompt), 2)


def exact_half_even_level(per_prompt):
    """The decimal mean rounded half to even: what the reference does NOT do."""
    mean = sum(Decimal(str(x)) for x in per_prompt) / len(per_prompt)
    return float(mean.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN))


def plain_levels(S, c, w_sum, w_count, theta, top_k):
    n = S.shape[2]
    counts = plain_counts(S, c, w_sum, w_count, theta, top_k)
    levels = []
    for layer in range(S.shape[1]):
        per_prompt = [round(int(k) / n, 2) for k in counts[:, layer]]  # Python's round
        levels.append(reference_layer_level(per_prompt))
    return levels


def silu_like(rng, prompts, layers, tokens, n):
    """Gated-MLP activations: act(gate) * up, mostly small, both signs."""
    gate = rng.normal(size=(prompts, layers, tokens, n)) + rng.normal(
        0, 0.5, size=(1, layers, 1, n)
    )
    up = rng.normal(size=(prompts, layers, tokens, n)) * rng.lognormal(
        0, 0.7, size=(1, layers, 1, n)
    )
    return (gate / (1 + np.exp(-gate)) * up).astype(np.float32)


def relu_like(rng, prompts, layers, tokens, n):
    """OPT fc1 outputs: most neurons negative for most tokens, many never positive."""
    bias = rng.normal(-1.5, 1.0, size=(1, layers, 1, n))
    a = rng.normal(size=(prompts, layers, tokens, n)) * 0.8 + bias
    a[a > -0.05] = np.maximum(a[a > -0.05], 0)  # exact zeros too
    return a.astype(np.float32)


SETTINGS = [
    (w, round(1 - w, 10), th, k)
    for w in (0.0, 0.1, 0.45, 1.0)
    for th in (-0.1, 0.0, 0.15, 0.3, 0.5, 0.9)
    for k in (1, 10, 64, 100)
]


@pytest.fixture(scope="module", params=["silu", "relu"])
def synthetic(request):
    rng = np.random.default_rng(7)
    make = silu_like if request.param == "silu" else relu_like
    acts = make(rng, 3, 4, 8, 64)
    S, c = plain_stats(list(acts))
    return request.param, acts, S, c


# --------------------------------------------------------------------------- vs plain


def test_index_and_direct_match_the_plain_implementation(synthetic):
    kind, _, S, c = synthetic
    index = LevelsIndex(S, c)
    for w_sum, w_count, th, k in SETTINGS:
        want_counts = plain_counts(S, c, w_sum, w_count, th, k)
        assert np.array_equal(index.counts(w_sum, w_count, th, k), want_counts), (kind, th, k)
        want = plain_levels(S, c, w_sum, w_count, th, k)
        got = index.evaluate(w_sum, w_count, th, k)
        assert list(got.levels) == want, (kind, w_sum, th, k)
        direct = levels_direct(S, c, w_sum=w_sum, w_count=w_count, threshold=th, top_k=k)
        assert direct.tolist() == want


def test_relu_like_data_has_dead_neurons_and_zero_top_k(synthetic):
    kind, _, S, c = synthetic
    if kind == "relu":  # the fixture exercises the zero-denominator rules
        assert (c == 0).any()
        assert (np.sort(S, axis=-1)[..., -64] == 0).any()  # S_(64) = 0 somewhere


def test_stats_from_torch_match_the_loops(synthetic):
    import torch

    from autosparse.calibration import positive_stats

    _, acts, S, c = synthetic
    for p in range(acts.shape[0]):
        a = torch.from_numpy(acts[p])  # (L, T, N): layers as the batch
        valid = torch.ones(a.shape[:2], dtype=torch.bool)
        got_s, got_c = positive_stats(a, valid)
        assert torch.equal(got_c, torch.from_numpy(c[p]).int())
        np.testing.assert_allclose(got_s.numpy(), S[p], rtol=1e-6)


def test_larger_random_statistics_match_direct():
    rng = np.random.default_rng(3)
    shape = (10, 6, 512)
    c = rng.binomial(40, rng.beta(2, 2, size=shape)).astype(np.int16)
    S = (c * rng.lognormal(0, 1, size=shape) * rng.gamma(4, 0.25, size=shape)).astype(np.float32)
    index = LevelsIndex(S, c, chunk_units=7)  # several build chunks
    for _ in range(150):
        w_sum = float(rng.choice([0.0, rng.uniform(0, 1)]))
        w_count = float(rng.uniform(0, 1))
        th = float(rng.uniform(-0.2, 2.0))
        k = int(rng.choice([1, 50, 100, 512, 900]))
        got = index.hundredths(w_sum, w_count, th, k) / 100
        want = levels_direct(S, c, w_sum=w_sum, w_count=w_count, threshold=th, top_k=k)
        assert np.array_equal(got, want), (w_sum, w_count, th, k)


def long_prompt_stats(seed, shape=(6, 4, 1024), tokens=300):
    """Long prompts: counts spread over 0..300, so most (prompt, layer, count) groups
    hold a few neurons and a layer has ~300 of them; a third of the neurons share one
    count, so some groups are large too."""
    rng = np.random.default_rng(seed)
    c = rng.binomial(tokens, rng.beta(2, 2, size=shape))
    c[..., : shape[-1] // 3] = rng.integers(0, tokens, size=shape[:-1] + (1,))
    S = (c * rng.lognormal(0, 1, size=shape) * rng.gamma(4, 0.25, size=shape)).astype(np.float32)
    return S, c


def test_long_prompts_with_many_distinct_counts_match_direct():
    S, c = long_prompt_stats(5)
    index = LevelsIndex(S, c, chunk_units=5)
    assert index.num_groups > 0.5 * 24 * 300  # the many-groups regime
    rng = np.random.default_rng(6)
    for _ in range(60):
        w_sum = float(rng.choice([0.0, rng.uniform(0.05, 1)]))
        w_count = round(1 - w_sum, 10) if rng.random() < 0.7 else float(rng.uniform(0, 1))
        th = float(rng.uniform(-0.1, 1.2))
        k = int(rng.choice([1, 25, 100, 400, 2000]))
        want_counts = plain_counts_vectorized(S, c, w_sum, w_count, th, k)
        assert np.array_equal(index.counts(w_sum, w_count, th, k), want_counts), (w_sum, th, k)
        want = levels_direct(S, c, w_sum=w_sum, w_count=w_count, threshold=th, top_k=k)
        assert np.array_equal(index.hundredths(w_sum, w_count, th, k) / 100, want)


def plain_counts_vectorized(S, c, w_sum, w_count, theta, top_k):
    """plain_counts with numpy per prompt and layer, for inputs too large for loops."""
    out = np.zeros(S.shape[:2], dtype=np.int64)
    for p in range(S.shape[0]):
        for layer in range(S.shape[1]):
            sums = S[p, layer].astype(np.float64)
            s_k = np.sort(sums)[::-1][min(top_k, sums.size) - 1]
            c_max = c[p, layer].max()
            with np.errstate(divide="ignore", invalid="ignore"):
                s = sums / s_k if s_k > 0 else np.where(sums > 0, np.inf, 0.0)
            norm = c[p, layer] / c_max if c_max > 0 else np.zeros(sums.size)
            score = (w_sum * s if w_sum > 0 else 0.0) + w_count * norm
            out[p, layer] = int((score > theta).sum())
    return out


# --------------------------------------------------------------------------- edge cases


def test_all_zero_layer():
    S = np.ones((2, 3, 16), dtype=np.float32)
    c = np.ones((2, 3, 16), dtype=np.int32)
    S[:, 1] = 0
    c[:, 1] = 0
    index = LevelsIndex(S, c)
    for th in (0.0, 0.2, 5.0):
        assert index.evaluate(0.45, 0.55, th).levels[1] == 0.0
    assert index.evaluate(0.45, 0.55, -0.01).levels[1] == 1.0
    assert levels_direct(S, c, w_sum=0.45, w_count=0.55, threshold=0.2, top_k=100)[1] == 0.0


def test_zero_top_k_sum_counts_every_neuron_that_fired():
    # 3 of 20 neurons ever fired, top_k = 10: S_(k) = 0, s = inf for those 3
    S = np.zeros((1, 1, 20), dtype=np.float32)
    c = np.zeros((1, 1, 20), dtype=np.int32)
    S[0, 0, :3] = [5.0, 0.5, 1e-6]
    c[0, 0, :3] = [4, 1, 1]
    index = LevelsIndex(S, c)
    assert index.counts(0.45, 0.55, 100.0, 10)[0, 0] == 3
    assert index.counts(0.45, 0.55, -1.0, 10)[0, 0] == 20
    # without the sum term only counts matter: n = 1, 0.25, 0.25
    assert index.counts(0.0, 1.0, 0.5, 10)[0, 0] == 1
    assert index.counts(0.0, 1.0, 0.2, 10)[0, 0] == 3


def test_top_k_beyond_n_uses_the_smallest_sum():
    rng = np.random.default_rng(0)
    S = rng.uniform(0.1, 2, size=(3, 2, 32)).astype(np.float32)
    c = rng.integers(1, 9, size=(3, 2, 32))
    index = LevelsIndex(S, c)
    for th in (0.2, 0.6, 1.5):
        assert (
            index.evaluate(0.45, 0.55, th, 10_000).levels
            == index.evaluate(0.45, 0.55, th, 32).levels
        )


def test_single_token_prompts():
    rng = np.random.default_rng(1)
    acts = silu_like(rng, 4, 2, 1, 50)  # T = 1: counts are 0 or 1
    S, c = plain_stats(list(acts))
    index = LevelsIndex(S, c)
    for w_sum, w_count, th, k in SETTINGS[::3]:
        assert list(index.evaluate(w_sum, w_count, th, k).levels) == plain_levels(
            S, c, w_sum, w_count, th, k
        )


def test_a_tie_with_the_threshold_does_not_count():
    S = np.ones((1, 1, 4), dtype=np.float32)
    c = np.array([[[4, 2, 2, 1]]])  # n = 1, 0.5, 0.5, 0.25
    index = LevelsIndex(S, c)
    assert index.counts(0.0, 1.0, 0.5, 1)[0, 0] == 1
    assert index.counts(0.5, 0.0, 0.5, 1)[0, 0] == 0  # s = 1 for all: 0.5 > 0.5 is false
    assert index.counts(0.5, 0.0, 0.4999, 1)[0, 0] == 4


def test_levels_fall_as_the_threshold_rises():
    rng = np.random.default_rng(5)
    S, c = plain_stats(list(silu_like(rng, 3, 3, 6, 80)))
    index = LevelsIndex(S, c)
    previous = None
    for th in np.linspace(-0.1, 3, 60):
        h = index.hundredths(0.3, 0.7, float(th), 20)
        if previous is not None:
            assert (h <= previous).all()
        previous = h
    assert (previous == 0).all()


def test_bad_settings_are_config_errors():
    index = LevelsIndex(np.ones((1, 1, 4), np.float32), np.ones((1, 1, 4), np.int32))
    for args in ((-0.1, 0.5, 0.2, 10), (0.5, math.nan, 0.2, 10), (0.5, 0.5, math.inf, 10)):
        with pytest.raises(ConfigError):
            index.evaluate(*args)
    with pytest.raises(ConfigError):
        index.evaluate(0.5, 0.5, 0.2, 0)
    with pytest.raises(ConfigError):
        LevelsIndex(np.ones((1, 1, 4), np.float32), np.ones((1, 1, 5), np.int32))
    with pytest.raises(ConfigError):
        LevelsIndex(-np.ones((1, 1, 4), np.float32), np.ones((1, 1, 4), np.int32))


# --------------------------------------------------------------------------- rounding


@pytest.mark.parametrize("n", [7, 100, 200, 1536, 8192])
def test_prompt_levels_round_like_python(n):
    table = prompt_level_table(n)
    assert [int(x) for x in table] == [round(round(k / n, 2) * 100) for k in range(n + 1)]


def stats_with_counts(counts, n=100):
    """S, c (P, L, n) whose count of neurons scoring above 0.5 with (w_sum 1, w_count 0,
    top_k 1) is ``counts[p][l]`` (each >= 1): that many neurons with S = 1, the rest 0."""
    counts = np.asarray(counts)
    S = np.zeros((*counts.shape, n), dtype=np.float32)
    S[np.arange(n) < counts[..., None]] = 1.0
    return S, (S > 0).astype(np.int32)


HALF_WAY = (1.0, 0.0, 0.5, 1)  # the setting stats_with_counts is built for


def test_rounding_follows_python_floats():
    # one prompt, N = 8192: 1024 neurons kept is exactly 0.125 -> 0.12 (Python's round)
    S = np.zeros((1, 1, 8192), dtype=np.float32)
    c = np.zeros((1, 1, 8192), dtype=np.int32)
    S[0, 0, :1024] = 1.0
    c[0, 0, :1024] = 1
    assert LevelsIndex(S, c).evaluate(1.0, 0.0, 0.5, 1).levels == (0.12,)
    # two prompts, mean exactly 0.155 and 0.065 in decimal: the float (0.15 + 0.16) / 2
    # is stored below 0.155 and goes down, (0.06 + 0.07) / 2 above 0.065 and goes up
    # (exact half-to-even rounding would give 0.16 and 0.06)
    S, c = stats_with_counts([[15, 6], [16, 7]])
    assert LevelsIndex(S, c).evaluate(*HALF_WAY).levels == (0.15, 0.07)
    assert levels_direct(S, c, w_sum=1.0, w_count=0.0, threshold=0.5, top_k=1).tolist() == [
        0.15,
        0.07,
    ]


def half_way_counts(prompts, layers, seed):
    """(prompts, layers) counts in 1..99 whose per-layer mean, in hundredths, ends in 5."""
    rng = np.random.default_rng(seed)
    columns = []
    while len(columns) < layers:
        base = int(rng.integers(8, 90))
        column = rng.integers(base - 7, base + 8, size=prompts)
        if (2 * int(column.sum())) % (2 * prompts) == prompts:
            columns.append(column)
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("prompts", [2, 4, 8, 24])
def test_half_way_means_round_like_the_reference(prompts):
    counts = half_way_counts(prompts, 60, seed=prompts)
    S, c = stats_with_counts(counts)
    per_prompt = [[round(int(k) / 100, 2) for k in counts[:, layer]] for layer in range(60)]
    want = [reference_layer_level(levels) for levels in per_prompt]
    # the cases cover both directions, and exact rounding would disagree on some
    lower = [math.floor(sum(counts[:, layer]) / prompts) / 100 for layer in range(60)]
    assert any(w == lo for w, lo in zip(want, lower, strict=True))
    assert any(w > lo for w, lo in zip(want, lower, strict=True))
    assert want != [exact_half_even_level(levels) for levels in per_prompt]

    index = LevelsIndex(S, c)
    assert list(index.evaluate(*HALF_WAY).levels) == want
    w_sum, w_count, th, k = HALF_WAY
    direct = levels_direct(S, c, w_sum=w_sum, w_count=w_count, threshold=th, top_k=k)
    assert direct.tolist() == want


def test_the_order_of_the_prompts_counts_like_in_the_reference():
    # float addition is not associative: the same eight levels in another order can give
    # another rounded mean, and autosparse adds them in the statistics' prompt order
    counts = half_way_counts(8, 200, seed=3)
    flipped = counts[::-1]
    # Python floats, as the reference's round() returns (numpy's round differs)
    levels = [[round(int(k) / 100, 2) for k in counts[:, j]] for j in range(200)]
    want = [reference_layer_level(column) for column in levels]
    want_flipped = [reference_layer_level(column[::-1]) for column in levels]
    assert want != want_flipped
    for order, expected in ((counts, want), (flipped, want_flipped)):
        S, c = stats_with_counts(order)
        assert list(LevelsIndex(S, c).evaluate(*HALF_WAY).levels) == expected


def test_eight_prompts_of_synthetic_activations_match_the_reference():
    rng = np.random.default_rng(21)
    S, c = plain_stats(list(silu_like(rng, 8, 3, 6, 64)))
    index = LevelsIndex(S, c)
    half_way = 0
    for w_sum, w_count, th, k in SETTINGS[::2]:
        want = plain_levels(S, c, w_sum, w_count, th, k)
        assert list(index.evaluate(w_sum, w_count, th, k).levels) == want, (w_sum, th, k)
        direct = levels_direct(S, c, w_sum=w_sum, w_count=w_count, threshold=th, top_k=k)
        assert direct.tolist() == want
        sums = prompt_level_table(64)[index.counts(w_sum, w_count, th, k)].sum(axis=0)
        half_way += int(((2 * sums) % 16 == 8).sum())  # mean in hundredths ends in 5
    assert half_way > 0  # the data exercised half-way means


# --------------------------------------------------------------------------- goal solving


@pytest.fixture(scope="module")
def goal_index():
    rng = np.random.default_rng(11)
    shape = (8, 6, 256)
    c = rng.binomial(30, rng.beta(2, 2, size=shape))
    S = (c * rng.lognormal(0, 1, size=shape)).astype(np.float32)
    return LevelsIndex(S, c, layers=range(6, 12))


@pytest.mark.parametrize("goal", [0.05, 0.2, 0.4, 0.63, 0.9])
def test_goal_solving_hits_the_goal_and_reports_what_it_achieved(goal_index, goal):
    result = goal_index.solve_goal(goal, 0.45)
    assert isinstance(result, LevelsResult)
    assert result.goal == goal and result.w_count == 0.55 and result.layers == tuple(range(6, 12))
    assert abs(result.mean - goal) <= 0.01  # within the rounding step
    assert result.mean == pytest.approx(sum(result.levels) / len(result.levels), abs=1e-12)
    again = goal_index.evaluate(0.45, 0.55, result.threshold)
    assert again.levels == result.levels and again.mean == result.mean
    # no threshold on a fine grid comes strictly closer
    for th in np.linspace(-0.05, 2.5, 300):
        mean = goal_index.evaluate(0.45, 0.55, float(th)).mean
        assert abs(mean - goal) >= abs(result.mean - goal) - 1e-12


def test_goal_solving_extremes_and_protocol(goal_index):
    full = goal_index.solve_goal(1.0, 0.3, 0.7, 50)
    assert full.mean == 1.0 and all(x == 1.0 for x in full.levels)
    threshold, levels = goal_index.solve(0.3, 0.7, 50, 0.5)
    assert goal_index.levels(0.3, 0.7, threshold, 50) == levels
    for bad in (0.0, -0.2, 1.5):
        with pytest.raises(ConfigError):
            goal_index.solve_goal(bad, 0.45)


def solve_by_full_evaluations(index, goal, w_sum, w_count, top_k):
    """docs/levels.md's goal solving written out, every threshold evaluated from scratch:
    the result any faster solver must reproduce exactly."""
    target = goal * 100 * len(index.layers)

    def mean_sum(th):
        h = index.hundredths(w_sum, w_count, th, top_k)
        return int(h.sum()), h

    lo, (lo_sum, lo_h) = -1.0, mean_sum(-1.0)
    hi = index._max_score(w_sum, w_count, top_k) + 1.0
    hi_sum, hi_h = mean_sum(hi)
    if hi_sum >= target:
        lo, lo_sum, lo_h = hi, hi_sum, hi_h
    else:
        while lo < (mid := (lo + hi) / 2) < hi:
            mid_sum, mid_h = mean_sum(mid)
            if mid_sum >= target:
                lo, lo_sum, lo_h = mid, mid_sum, mid_h
                if mid_sum == target:
                    break
            else:
                hi, hi_sum, hi_h = mid, mid_sum, mid_h
    if hi_sum < target and abs(hi_sum - target) < abs(lo_sum - target):
        best, best_h = hi, hi_h
    else:
        best, best_h = lo, lo_h
    for decimals in range(1, 13):
        short = round(best, decimals)
        if short == best:
            break
        if np.array_equal(index.hundredths(w_sum, w_count, short, top_k), best_h):
            best = short
            break
    return best, tuple(best_h / 100)


@pytest.mark.parametrize("seed", [1, 2])
def test_goal_solving_equals_solving_with_full_evaluations(seed):
    S, c = long_prompt_stats(seed, shape=(5, 3, 512))
    S[0, 1, :] = 0  # a layer that never fired on a prompt: S_(k) = 0
    c[0, 1, :] = 0
    index = LevelsIndex(S, c)
    for goal, w_sum, w_count, top_k in [
        (0.4, 0.45, 0.55, 100),
        (0.15, 0.9, 0.1, 25),
        (0.7, 0.1, 0.9, 400),
        (0.33, 0.0, 1.0, 100),
        (0.5, 0.6, 0.2, 1),
    ]:
        result = index.solve_goal(goal, w_sum, w_count, top_k)
        want = solve_by_full_evaluations(index, goal, w_sum, w_count, top_k)
        assert (result.threshold, result.levels) == want, (goal, w_sum, top_k)


def test_goal_below_what_any_threshold_reaches():
    # every prompt has 5 neurons with S_(k) = 0 semantics: they always count
    S = np.zeros((2, 2, 100), dtype=np.float32)
    c = np.zeros((2, 2, 100), dtype=np.int32)
    S[:, :, :5] = 1.0
    c[:, :, :5] = 1
    index = LevelsIndex(S, c)
    result = index.solve_goal(0.01, 0.5, 0.5, top_k=10)
    assert result.levels == (0.05, 0.05) and result.mean == 0.05


# --------------------------------------------------------------------------- files


def test_levels_file_round_trip(tmp_path, goal_index):
    result = goal_index.solve_goal(0.4, 0.45)
    path = write_levels_file(tmp_path / "sub" / "levels.json", result, model="tiny", extra={"x": 1})
    loaded = read_levels_file(path)
    assert loaded.levels == list(result.levels)
    assert loaded.layers == "6:12"
    assert loaded.params == {
        "w_sum": 0.45,
        "w_count": 0.55,
        "threshold": result.threshold,
        "top_k": 100,
    }
    assert loaded.goal == 0.4 and loaded.model == "tiny" and loaded.extra == {"x": 1}
    assert loaded.mean == pytest.approx(result.mean)


def test_plain_lists_of_the_reference(tmp_path):
    for name, text in [
        ("a.json", "[0.4, 0.35, 1]"),
        ("b.txt", "0.4\n0.35\n1\n"),
        ("c.txt", "0.4, 0.35, 1"),
    ]:
        path = tmp_path / name
        path.write_text(text)
        loaded = read_levels_file(path)
        assert loaded.levels == [0.4, 0.35, 1.0] and loaded.layers is None and loaded.params == {}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[0.4, 1.2]",
        "[0.0, 0.5]",
        "0.4\nabc",
        "{not json",
        '{"levels": []}',
        '{"x": 1}',
        '{"levels": [0.4, 0.5], "layers": "6:27"}',
        '{"levels": [0.4, "a"]}',
        "[true]",
        '{"levels": [0.5], "layers": "six"}',
    ],
)
def test_bad_level_files_are_one_line_config_errors(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_levels_file(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_level_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read levels file"):
        read_levels_file(tmp_path / "nope.json")


def test_write_refuses_levels_outside_the_unit_interval(tmp_path):
    with pytest.raises(ConfigError):
        write_levels_file(tmp_path / "x.json", [0.5, 0.0])
    with pytest.raises(ConfigError):
        write_levels_file(tmp_path / "x.json", [0.5, 0.4], layers="6:27")
    path = write_levels_file(tmp_path / "x.json", [0.5, 0.4], layers=[3, 4], goal=0.45)
    doc = json.loads(path.read_text())
    assert doc["layers"] == "3:5" and doc["mean"] == pytest.approx(0.45)


def test_average_levels():
    assert average_levels([[0.4, 0.15, 1.0], [0.5, 0.16, 1.0]]) == [0.45, 0.16, 1.0]
    assert average_levels([[0.12, 0.13], [0.13, 0.14]]) == [0.12, 0.14]  # ties to even
    assert average_levels([[0.333]]) == [0.33]
    with pytest.raises(ConfigError):
        average_levels([[0.4], [0.4, 0.5]])
    with pytest.raises(ConfigError):
        average_levels([])
