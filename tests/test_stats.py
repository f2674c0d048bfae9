"""Paired bootstrap differences and standard errors on known cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from autosparse.errors import ConfigError
from autosparse.stats import (
    PairedDiff,
    SampleMismatchError,
    mean_and_stderr,
    paired_difference,
    power_factor,
)


def test_identical_scores_give_zero_with_zero_width():
    ids = [5, 1, 9, 3]
    s = [0.1, 2.0, 3.5, 0.0]
    d = paired_difference(ids, s, ids, s)
    assert d == PairedDiff(mean=0.0, low=0.0, high=0.0, n=4, level=0.95)
    assert not d.excludes_zero


def test_float32_rounding_noise_is_no_difference():
    # the same scores computed by two float32 paths that add in another order
    ids = list(range(40))
    b = np.random.default_rng(3).uniform(0.5, 1.0, size=40).astype(np.float32)
    a = b * np.float32(1 + 2**-22)  # a few units in the last place
    assert np.any(a != b)
    d = paired_difference(ids, a.tolist(), ids, b.tolist())
    assert d == PairedDiff(mean=0.0, low=0.0, high=0.0, n=40, level=0.95)
    assert d.detectable() is None and d.needed() is None
    # a real difference of one part in ten thousand is still one
    d = paired_difference(ids, (b.astype(np.float64) * 1.0001).tolist(), ids, b.tolist())
    assert d.mean > 0 and d.excludes_zero


def test_constant_shift_is_that_shift():
    ids = list(range(30))
    b = np.random.default_rng(1).normal(size=30)
    d = paired_difference(ids, b + 0.3, ids, b)
    assert d.mean == pytest.approx(0.3)
    assert d.low == pytest.approx(0.3) and d.high == pytest.approx(0.3)
    assert d.excludes_zero


def test_pairs_by_id_not_by_position():
    a = paired_difference([1, 2, 3], [10.0, 20.0, 30.0], [3, 1, 2], [29.0, 9.0, 19.0])
    assert a.mean == pytest.approx(1.0) and a.low == a.high == pytest.approx(1.0)


def test_interval_covers_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small = rng.normal(1.0, 1.0, size=20)
    big = rng.normal(1.0, 1.0, size=2000)
    ds = paired_difference(range(20), small, range(20), np.zeros(20))
    db = paired_difference(range(2000), big, range(2000), np.zeros(2000))
    assert ds.low < ds.mean < ds.high
    assert db.low < db.mean < db.high
    assert (db.high - db.low) < (ds.high - ds.low)
    # Normal theory: the 95% interval is about +-1.96 standard errors.
    se = big.std(ddof=1) / math.sqrt(big.size)
    assert (db.high - db.low) == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_deterministic_under_seed():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=50), rng.normal(size=50)
    ids = list(range(50))
    assert paired_difference(ids, a, ids, b, seed=7) == paired_difference(ids, a, ids, b, seed=7)
    assert paired_difference(ids, a, ids, b, seed=7) != paired_difference(ids, a, ids, b, seed=8)
    # Argument order of the pairs does not matter either.
    perm = rng.permutation(50)
    shuffled = paired_difference([ids[i] for i in perm], a[perm], ids, b, seed=7)
    assert shuffled == paired_difference(ids, a, ids, b, seed=7)


def test_mismatched_ids_refused():
    with pytest.raises(SampleMismatchError, match="different samples") as info:
        paired_difference([1, 2, 3], [1.0, 2.0, 3.0], [1, 2, 4], [1.0, 2.0, 3.0])
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    assert "3" in str(info.value) and "4" in str(info.value)


def test_subset_only_when_asked():
    with pytest.raises(SampleMismatchError):
        paired_difference([1, 2, 3], [1.0, 2.0, 3.0], [1, 2], [0.0, 0.0])
    d = paired_difference([1, 2, 3], [1.0, 2.0, 30.0], [1, 2], [0.0, 1.0], allow_subset=True)
    assert d.n == 2 and d.mean == pytest.approx(1.0)
    with pytest.raises(SampleMismatchError, match="no sample ids"):
        paired_difference([1], [1.0], [2], [1.0], allow_subset=True)


@pytest.mark.parametrize(
    "kwargs, args",
    [
        ({}, ([1, 1], [1.0, 2.0], [1, 1], [1.0, 2.0])),  # duplicate id
        ({}, ([1, 2], [1.0], [1, 2], [1.0, 2.0])),  # length mismatch
        ({}, ([1, 2], [1.0, float("nan")], [1, 2], [1.0, 2.0])),
        ({"level": 1.0}, ([1], [1.0], [1], [1.0])),
        ({"n_boot": 0}, ([1], [1.0], [1], [1.0])),
    ],
)
def test_bad_input(kwargs, args):
    with pytest.raises(ValueError):
        paired_difference(*args, **kwargs)


def test_mean_and_stderr():
    m, se = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5
    assert se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    m1, se1 = mean_and_stderr([7.0])
    assert m1 == 7.0 and math.isnan(se1)
    with pytest.raises(ValueError):
        mean_and_stderr([])


def test_paired_diff_dict_round_trip():
    d = PairedDiff(0.1, -0.2, 0.4, 10, 0.9)
    assert PairedDiff.from_dict(d.to_dict()) == d


# ----------------------------------------------------------------- power figures

# z_0.975 + z_0.8, the factor of the paired normal approximation at 95% and 80% power.
Z_95_80 = 1.959963984540054 + 0.8416212335729143


def _closed_form(d: np.ndarray, z: float = Z_95_80) -> tuple[float, float, int]:
    s = float(np.std(d, ddof=1))
    return s, z * s / math.sqrt(d.size), math.ceil((z * s / abs(d.mean())) ** 2)


def test_power_factor():
    assert power_factor() == pytest.approx(Z_95_80, abs=1e-12)
    assert power_factor(0.9, 0.9) == pytest.approx(1.6448536269514722 + 1.2815515655446004)
    with pytest.raises(ValueError):
        power_factor(0.95, 1.0)


@pytest.mark.parametrize("n, shift", [(40, 0.05), (300, 0.1), (1000, 0.02)])
def test_power_figures_match_the_closed_form(n, shift):
    rng = np.random.default_rng(n)
    b = (rng.random(n) < 0.3).astype(float)  # 0/1 scores, like accuracy per document
    a = np.where(rng.random(n) < 0.2, 1.0 - b, b) + rng.normal(shift, 0.1, size=n)
    diff = paired_difference(range(n), a, range(n), b)
    s, detectable, needed = _closed_form(a - b)
    assert diff.sd == pytest.approx(s, rel=1e-12)
    assert diff.detectable() == pytest.approx(detectable, rel=1e-12)
    assert diff.needed() == needed
    # Another level and power change the factor only.
    at_90 = paired_difference(range(n), a, range(n), b, level=0.9)
    z = 1.6448536269514722 + 1.2815515655446004
    assert at_90.detectable(power=0.9) == pytest.approx(_closed_form(a - b, z)[1], rel=1e-12)
    assert at_90.needed(power=0.9) == _closed_form(a - b, z)[2]


def test_detectable_is_about_1_43_half_widths_of_the_bootstrap_interval():
    rng = np.random.default_rng(5)
    d = rng.normal(0.0, 1.0, size=2000)
    diff = paired_difference(range(2000), d, range(2000), np.zeros(2000))
    half_width = (diff.high - diff.low) / 2
    assert diff.detectable() == pytest.approx(Z_95_80 / 1.96 * half_width, rel=0.1)


def test_an_unclear_difference_needs_more_documents_than_it_has():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.05, 1.0, size=60), rng.normal(0.0, 1.0, size=60)
    diff = paired_difference(range(60), a, range(60), b)
    assert not diff.excludes_zero and diff.mean != 0
    assert diff.needed() > 2 * 60  # an interval covering 0 means |mean| < ~1.96 sd/sqrt(n)


def test_no_spread_gives_no_power_figures():
    ids = list(range(100))
    same = paired_difference(ids, [1.0, 0.0] * 50, ids, [1.0, 0.0] * 50)  # identical answers
    assert same.sd == 0.0 and not same.has_spread
    assert same.detectable() is None and same.needed() is None
    shifted = paired_difference(ids, [1.0] * 100, ids, [0.0] * 100)
    assert shifted.sd == 0.0 and shifted.detectable() is None and shifted.needed() is None


def test_power_figures_on_one_and_two_pairs():
    one = paired_difference([1], [0.7], [1], [0.2])
    assert one.n == 1 and one.sd is None
    assert one.detectable() is None and one.needed() is None
    two = paired_difference([1, 2], [1.0, 1.0], [1, 2], [0.0, 1.0])  # differences 1 and 0
    sd = math.sqrt(0.5)
    assert two.sd == pytest.approx(sd)
    assert two.detectable() == pytest.approx(Z_95_80 * sd / math.sqrt(2))
    assert two.needed() == math.ceil((Z_95_80 * sd / 0.5) ** 2)  # 16
    zero_mean = paired_difference([1, 2], [1.0, 0.0], [1, 2], [0.0, 1.0])
    assert zero_mean.mean == 0 and zero_mean.needed() is None
    assert zero_mean.detectable() == pytest.approx(Z_95_80 * math.sqrt(2) / math.sqrt(2))


def test_stored_dicts_old_and_new():
    old = {"mean": 0.02, "low": -0.03, "high": 0.07, "n": 30}  # a trial stored before sd
    d = PairedDiff.from_dict(old)
    assert d.sd is None and d.level == 0.95
    assert d.detectable() is None and d.needed() is None
    new = paired_difference(range(50), np.arange(50.0) % 3, range(50), np.arange(50.0) % 2)
    stored = json.loads(json.dumps(new.to_dict(), allow_nan=False))
    assert stored["sd"] == pytest.approx(new.sd) and stored["power"] == 0.8
    assert stored["detectable"] == pytest.approx(new.detectable())
    assert stored["needed"] == new.needed()
    back = PairedDiff.from_dict(stored)
    assert back == new and back.sd == new.sd
    # One pair: no sd, and the dict stays valid JSON (None, not NaN).
    one = paired_difference([1], [1.0], [1], [0.0]).to_dict()
    assert one["sd"] is None and one["detectable"] is None and one["needed"] is None
    json.dumps(one, allow_nan=False)
