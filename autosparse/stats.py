"""Paired statistics on per-sample scores: the mean difference between two evaluations
on the same documents, with a paired bootstrap confidence interval, and what the sample
could detect (the power figures; docs/statistics.md gives the method).

Pure functions on sequences of numbers. numpy is imported inside the functions so that
importing this module (e.g. through ``autosparse.report``) costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from autosparse.errors import ConfigError

# Bound on the bootstrap index matrix (resamples x samples) held in memory at once.
_MAX_CELLS = 4_000_000

#: Power at which the detectable difference and the documents to resolve are reported.
POWER = 0.8

#: Two scores of one document closer than this, relative to the larger, are the same score:
#: scores computed in float32 by two paths that add in another order (a levels vector of
#: 0.4 everywhere and CoreInfer keep 0.4, say) differ by a few units of float32 rounding
#: (about 1e-7 relative), never by a difference a setting makes.
SAME_SCORE_RTOL = 1e-5


class SampleMismatchError(ConfigError, ValueError):
    """Two evaluations were compared on different sets of sample ids."""


@dataclass(frozen=True)
class PairedDiff:
    """Mean of ``a - b`` over ``n`` paired samples and its bootstrap interval
    ``[low, high]`` at confidence ``level``.

    ``sd`` is the sample standard deviation (ddof=1) of the ``n`` per-sample differences:
    None when unknown (one pair, or a difference stored before it was recorded). It feeds
    the power figures, ``detectable()`` and ``needed()``. Equality compares the estimate
    (mean, interval, n, level), not ``sd``."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95
    sd: float | None = field(default=None, compare=False)

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies entirely above or entirely below zero."""
        return self.low > 0.0 or self.high < 0.0

    @property
    def has_spread(self) -> bool:
        """True when the differences vary (``sd`` known and positive, at least 2 pairs):
        the condition for the power figures."""
        return self.sd is not None and self.n >= 2 and self.sd > 0.0

    def detectable(self, power: float = POWER) -> float | None:
        """The smallest true mean difference (either sign) that a two-sided paired test at
        this ``level`` would find with probability ``power`` on ``n`` pairs with this
        spread: ``(z_(1-alpha/2) + z_power) * sd / sqrt(n)``, the normal approximation.
        None without spread (see ``has_spread``)."""
        if not self.has_spread:
            return None
        return power_factor(self.level, power) * float(self.sd) / math.sqrt(self.n)

    def needed(self, power: float = POWER) -> int | None:
        """Pairs, in all, at which the observed mean difference would be the detectable one:
        ``ceil(((z_(1-alpha/2) + z_power) * sd / mean) ** 2)``. None without spread or when
        the observed mean is 0 (no sample size resolves a zero difference)."""
        if not self.has_spread or self.mean == 0.0:
            return None
        k = power_factor(self.level, power) * float(self.sd) / abs(self.mean)
        # The rounding guard keeps an exact integer (e.g. 16.000000000000004) from becoming 17.
        return max(1, math.ceil(k * k - 1e-9))

    def to_dict(self) -> dict[str, Any]:
        """The fields, plus the power figures at ``POWER`` for readers of stored reports
        (``from_dict`` recomputes them). Non-finite numbers become None (JSON-safe)."""
        d: dict[str, Any] = {
            "mean": self.mean,
            "low": self.low,
            "high": self.high,
            "n": self.n,
            "level": self.level,
            "sd": self.sd,
            "power": POWER,
            "detectable": self.detectable(),
            "needed": self.needed(),
        }
        return {k: _json_safe(v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairedDiff:
        """Inverse of ``to_dict``; also reads dicts stored without ``level`` or ``sd``."""
        sd = d.get("sd")
        return cls(
            mean=float(d["mean"]),
            low=float(d["low"]),
            high=float(d["high"]),
            n=int(d["n"]),
            level=float(d.get("level", 0.95)),
            sd=None if sd is None else float(sd),
        )


def _json_safe(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def power_factor(level: float = 0.95, power: float = POWER) -> float:
    """``z_(1-alpha/2) + z_power`` for a two-sided test at confidence ``level``
    (alpha = 1 - level): 2.80 at 95% and 80% power."""
    if not (0.0 < level < 1.0 and 0.0 < power < 1.0):
        raise ValueError(f"level and power must be in (0, 1), got {level} and {power}")
    z = NormalDist()
    return z.inv_cdf(1.0 - (1.0 - level) / 2.0) + z.inv_cdf(power)


def mean(xs: Sequence[float]) -> float:
    """The plain mean of ``xs``; NaN for an empty sequence."""
    return float(sum(xs) / len(xs)) if xs else float("nan")


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
    inputs and ``seed``. Two scores of a document within ``SAME_SCORE_RTOL`` of each other
    (relative) count as equal. When every difference is equal, the interval has zero width.
    The result carries the standard deviation of the differences (None for one pair).
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

    av = np.array([a[i] for i in common], dtype=np.float64)
    bv = np.array([b[i] for i in common], dtype=np.float64)
    d = av - bv
    d[np.abs(d) <= SAME_SCORE_RTOL * np.maximum(np.abs(av), np.abs(bv))] = 0.0  # rounding noise
    n = d.size
    if np.all(d == d[0]):
        # Every resample has the same mean: report it exactly rather than with rounding noise.
        c = float(d[0])
        return PairedDiff(mean=c, low=c, high=c, n=n, level=level, sd=0.0 if n > 1 else None)
    mean = float(d.mean())
    sd = float(d.std(ddof=1))

    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, _MAX_CELLS // n)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        boot[start:stop] = d[idx].mean(axis=1)
    alpha = 1.0 - level
    low, high = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0])
    return PairedDiff(mean=mean, low=float(low), high=float(high), n=n, level=level, sd=sd)
