"""Paired bootstrap differences and standard errors on known cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autosparse.errors import ConfigError
from autosparse.stats import PairedDiff, SampleMismatchError, mean_and_stderr, paired_difference


def test_identical_scores_give_zero_with_zero_width():
    ids = [5, 1, 9, 3]
    s = [0.1, 2.0, 3.5, 0.0]
    d = paired_difference(ids, s, ids, s)
    assert d == PairedDiff(mean=0.0, low=0.0, high=0.0, n=4, level=0.95)
    assert not d.excludes_zero


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
