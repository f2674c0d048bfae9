"""Paired statistics on per-sample scores: the mean difference between two evaluations
on the same documents, with a paired bootstrap confidence interval.

Pure functions on sequences of numbers. numpy is imported inside the functions so that
importing this module (e.g. through ``autosparse.report``) costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from autosparse.errors import ConfigError

# Bound on the bootstrap index matrix (resamples x samples) held in memory at once.
_MAX_CELLS = 4_000_000


class SampleMismatchError(ConfigError, ValueError):
    """Two evaluations were compared on different sets of sample ids."""


@dataclass(frozen=True)
class PairedDiff:
    """Mean of ``a - b`` over ``n`` paired samples and its bootstrap interval
    ``[low, high]`` at confidence ``level``."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies entirely above or entirely below zero."""
        return self.low > 0.0 or self.high < 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairedDiff:
        return cls(
            mean=float(d["mean"]),
            low=float(d["low"]),
            high=float(d["high"]),
            n=int(d["n"]),
            level=float(d.get("level", 0.95)),
        )


def mean_and_stderr(scores: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std with ddof=1 over sqrt(n)).

    The standard error is NaN for a single score (it is undefined, not zero).
    Raises ValueError for no scores or non-finite scores."""
    import numpy as np

    x = np.asarray(scores, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("cannot take the mean of zero scores")
    if not np.all(np.isfinite(x)):
        raise ValueError("scores contain NaN or infinite values")
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan
    return mean, float(x.std(ddof=1) / math.sqrt(x.size))


def _as_pairs(ids: Sequence[Any], scores: Sequence[float], name: str) -> dict[Any, float]:
    if len(ids) != len(scores):
        raise ValueError(f"{name}: {len(ids)} sample ids but {len(scores)} scores")
    out: dict[Any, float] = {}
    for i, s in zip(ids, scores, strict=True):
        key = i.item() if hasattr(i, "item") else i  # numpy scalars hash like ints anyway
        if key in out:
            raise ValueError(f"{name}: sample id {key!r} occurs more than once")
        s = float(s)
        if not math.isfinite(s):
            raise ValueError(f"{name}: score of sample {key!r} is {s}")
        out[key] = s
    return out


def _sorted_ids(ids: set[Any]) -> list[Any]:
    try:
        return sorted(ids)
    except TypeError:  # mixed id types: any fixed order keeps the bootstrap deterministic
        return sorted(ids, key=repr)


def _describe(ids: set[Any], limit: int = 5) -> str:
    shown = _sorted_ids(ids)[:limit]
    more = f", ... ({len(ids)} in all)" if len(ids) > limit else ""
    return ", ".join(repr(i) for i in shown) + more


def paired_difference(
    ids_a: Sequence[Any],
    scores_a: Sequence[float],
    ids_b: Sequence[Any],
    scores_b: Sequence[float],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    allow_subset: bool = False,
) -> PairedDiff:
    """Mean paired difference ``a - b`` over samples matched by id, with a percentile
    bootstrap interval (samples resampled with replacement, pairs kept together).

    The two id sets must be identical; otherwise SampleMismatchError (a ConfigError and a
    ValueError) names the ids that differ. With ``allow_subset=True`` the comparison uses
    the ids both sides share (at least one). Order of ids does not matter; duplicate ids
    or non-finite scores raise ValueError. The result is a deterministic function of the
    inputs and ``seed``. When every difference is equal, the interval has zero width.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not (0.0 < level < 1.0):
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    a = _as_pairs(ids_a, scores_a, "first evaluation")
    b = _as_pairs(ids_b, scores_b, "second evaluation")
    only_a = a.keys() - b.keys()
    only_b = b.keys() - a.keys()
    if (only_a or only_b) and not allow_subset:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} only in the first ({_describe(only_a)})")
        if only_b:
            parts.append(f"{len(only_b)} only in the second ({_describe(only_b)})")
        raise SampleMismatchError(
            "cannot pair evaluations on different samples: "
            + "; ".join(parts)
            + ". Evaluate both on the same sample (same --limit and --seed)."
        )
    common = _sorted_ids(a.keys() & b.keys())
    if not common:
        raise SampleMismatchError("the two evaluations share no sample ids")

    import numpy as np

    d = np.array([a[i] - b[i] for i in common], dtype=np.float64)
    n = d.size
    if np.all(d == d[0]):
        # Every resample has the same mean: report it exactly rather than with rounding noise.
        c = float(d[0])
        return PairedDiff(mean=c, low=c, high=c, n=n, level=level)
    mean = float(d.mean())

    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, _MAX_CELLS // n)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        boot[start:stop] = d[idx].mean(axis=1)
    alpha = 1.0 - level
    low, high = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0])
    return PairedDiff(mean=mean, low=float(low), high=float(high), n=n, level=level)
