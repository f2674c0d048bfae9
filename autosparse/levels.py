"""The sparsity-levels method: per-layer keep ratios from calibration statistics.

For a setting (``w_sum``, ``w_count``, ``threshold``, ``top_k``) and every calibration
prompt p and layer l, from the prompt's positive sums ``S`` and counts ``c``
(docs/method.md, "Sparsity levels"):

    s_i = S_i / S_(k)        S_(k): the top_k-th largest S of (p, l)
    n_i = c_i / max_j c_j
    score_i = w_sum * s_i + w_count * n_i
    level(p, l) = round(#{i : score_i > threshold} / N, 2)

and a layer's level is the mean over prompts, rounded to 2 decimals. The level is a
keep ratio (CoreInfer's "sparsity" number): 0.40 keeps 40% of the layer's neurons.

Definitions where the formula is silent, relied on by callers and tests:

- **Strictness.** A neuron counts only if ``score_i > threshold``; a tie does not count.
- **top_k larger than N** uses the smallest S (top_k is clipped to N). top_k < 1 is an error.
- **S_(k) = 0** (fewer than top_k neurons were ever positive): ``s_i`` takes its limit
  as S_(k) -> 0+, i.e. +inf for S_i > 0 and 0 for S_i = 0. With ``w_sum > 0`` every
  neuron that was ever positive counts; ``w_sum = 0`` drops the term.
- **All counts 0** (the layer never fired on the prompt): ``n_i = 0``. Then S is 0 too,
  every score is 0, and the level is 1.0 for a negative threshold, else 0.0.
- **Rounding, as the reference computes it.** The per-prompt level is exactly Python's
  ``round(count / N, 2)`` (e.g. 1024 / 8192 = 0.125 -> 0.12). The layer level is the
  reference's ``round(sum(levels) / P, 2)`` on those float levels: a float64 sum from
  the first prompt to the last (Python 3.11's ``sum``, which the reference ran),
  divided by P, and Python's ``round``. A mean that is exactly half-way in decimal
  goes whichever way its float lands: 0.15 and 0.16 average to 0.15, because
  ``(0.15 + 0.16) / 2`` is stored just below 0.155.
- **Arithmetic.** ``score_i > threshold`` is decided in float64 as
  ``S_i > S_(k) * (threshold - w_count * n_i) / w_sum``; the seed computed scores in
  float32, so a neuron whose score is within ~1e-7 of the threshold can count
  differently there (and so can a per-prompt level on a rounding boundary).

``LevelsIndex`` precomputes what does not depend on the setting, so a setting turns
into levels in milliseconds (see docs/levels.md for how, docs/performance.md for
numbers); ``levels_direct`` is the plain vectorized formula, for small inputs and
cross-checks. ``solve`` / ``solve_goal`` find the threshold whose mean level comes
closest to a goal. Level files: ``write_levels_file`` / ``read_levels_file``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autosparse.engine.config import layer_range_text
from autosparse.errors import ConfigError

if TYPE_CHECKING:
    from autosparse.calibration import CalibrationStats
    from autosparse.engine.config import LayerRange

DEFAULT_TOP_K = 100
FILE_FORMAT = "autosparse-levels"


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class LevelsResult:
    """Per-layer levels of one setting. ``mean`` is the mean of exactly these ``levels``
    (the achieved mean, never a planned one); ``layers`` their absolute layer indices;
    ``goal`` the mean that was asked for when the threshold was solved for."""

    levels: tuple[float, ...]
    mean: float
    w_sum: float
    w_count: float
    threshold: float
    top_k: int
    layers: tuple[int, ...]
    goal: float | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {
            "w_sum": self.w_sum,
            "w_count": self.w_count,
            "threshold": self.threshold,
            "top_k": self.top_k,
        }

    @property
    def layer_range(self) -> str | None:
        """``"START:STOP"`` when the layers are contiguous, else None."""
        return layer_range_text(self.layers)


def check_setting(w_sum: float, w_count: float, threshold: float, top_k: int) -> None:
    """ConfigError unless the weights are finite and >= 0, the threshold finite and top_k >= 1."""
    for name, value in (("w_sum", w_sum), ("w_count", w_count)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{name} must be a finite number >= 0, not {value}")
    if not math.isfinite(threshold):
        raise ConfigError(f"threshold must be a finite number, not {threshold}")
    if int(top_k) != top_k or top_k < 1:
        raise ConfigError(f"top_k must be a whole number >= 1, not {top_k}")


# --------------------------------------------------------------------------- rounding


def prompt_level_table(n: int) -> np.ndarray:
    """``table[k]`` = hundredths of Python's ``round(k / n, 2)`` for k = 0..n (int64).

    Python rounds the float ``k / n``: 1024 / 8192 = 0.125 is exact and goes to even
    (0.12), while 1 / 200 = 0.005 is stored slightly above and goes up (0.01)."""
    return np.array([round(round(k / n, 2) * 100) for k in range(n + 1)], dtype=np.int64)


def _layer_hundredths(prompt_hundredths: np.ndarray) -> np.ndarray:
    """(P, L) per-prompt hundredths -> (L,) per-layer hundredths, computed as the reference
    does: ``round(sum(levels) / P, 2)`` over the float levels, prompts in row order.

    Float addition is not associative, so the order and the method of summation decide a
    mean that is half-way in decimal; every step below is the reference's."""
    p = prompt_hundredths.shape[0]
    if p == 0:
        raise ConfigError("no calibration prompts to average")
    # j / 100 is correctly rounded, so these are exactly the floats round(k / N, 2) returned.
    levels = prompt_hundredths / 100.0
    # Python 3.11's sum() of floats adds left to right in float64; so does add.accumulate
    # along the prompts (a reduction such as .sum() may add pairwise instead).
    means = np.add.accumulate(levels, axis=0)[-1] / p
    # Python's round(x, 2) rounds the float's exact binary value (numpy's np.round does
    # not); only L values, so a Python loop costs microseconds.
    return np.array([round(round(m, 2) * 100) for m in means.tolist()], dtype=np.int64)


# --------------------------------------------------------------------------- direct


def levels_direct(
    S: np.ndarray,
    c: np.ndarray,
    *,
    w_sum: float,
    w_count: float,
    threshold: float,
    top_k: int = DEFAULT_TOP_K,
) -> np.ndarray:
    """The formula evaluated as written, vectorized: S, c (P, L, N) -> levels (L,).

    Same definitions and results as ``LevelsIndex`` (up to float64 ties), but it touches
    every element several times per setting: use it for small inputs and checks."""
    check_setting(w_sum, w_count, threshold, top_k)
    S = np.asarray(S, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    n = S.shape[-1]
    k = min(int(top_k), n)
    s_k = -np.partition(-S, k - 1, axis=-1)[..., k - 1 : k]  # (P, L, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(s_k > 0, S / s_k, np.where(S > 0, np.inf, 0.0))
        c_max = c.max(axis=-1, keepdims=True)
        norm = np.where(c_max > 0, c / c_max, 0.0)
        score = (w_sum * s if w_sum > 0 else 0.0) + w_count * norm
    counts = (score > threshold).sum(axis=-1)  # (P, L)
    hundredths = _layer_hundredths(prompt_level_table(n)[counts])
    return hundredths / 100


# --------------------------------------------------------------------------- the index


class LevelsIndex:
    """Calibration statistics arranged so that any setting becomes levels in milliseconds.

    Per prompt and layer (a "unit"), the neurons are grouped by their count c (at most
    T + 1 values) and sorted by S inside each group. For a setting, neuron i counts iff
    ``S_i > t(c_i)`` with ``t(c) = S_(k) * (threshold - w_count * c / c_max) / w_sum``,
    one threshold per group. A group whose smallest S is above its threshold counts
    whole, one whose largest S is not counts nothing; only the groups that straddle
    their threshold need a search. The search is a lookup: each group's S range is cut
    into as many cells as it has neurons, evenly in the float32 bit pattern (a
    piecewise-linear log scale), and a table gives each cell's start and first value.
    Most cells hold 0 or 1 neuron, so one table read settles a group; the rest finish
    with a short binary search. The work per setting grows with the number of groups
    (units x distinct counts), not with the number of neurons.

    Memory: about 12 bytes per neuron (sorted S bits and the cell table) plus the S it
    was built from. It also satisfies the tuner's ``LevelsSource`` protocol (``levels``,
    ``solve``).
    """

    def __init__(
        self,
        S: np.ndarray,
        c: np.ndarray,
        layers: Sequence[int] | None = None,
        *,
        chunk_units: int = 512,
    ) -> None:
        """S (P, L, N) positive sums, c (P, L, N) positive counts; ``layers`` the L absolute
        layer indices (default 0..L-1)."""
        S = np.asarray(S)
        c = np.asarray(c)
        if S.ndim != 3 or S.shape != c.shape or 0 in S.shape:
            raise ConfigError(f"need S and c of one shape (P, L, N), got {S.shape} and {c.shape}")
        p, n_layers, n = S.shape
        self.layers = tuple(range(n_layers)) if layers is None else tuple(int(i) for i in layers)
        if len(self.layers) != n_layers:
            raise ConfigError(f"{len(self.layers)} layer indices for {n_layers} layers")
        self.num_prompts, self.num_neurons = p, n
        units = p * n_layers
        if units * n >= 2**31:
            raise ConfigError(
                f"{p} prompts x {n_layers} layers x {n} neurons is too many for one index; "
                "use fewer calibration prompts"
            )
        S = np.asarray(S, dtype=np.float32).reshape(units, n)
        if not np.isfinite(S).all() or (S < 0).any():
            raise ConfigError("positive sums S must be finite and >= 0")
        c = np.asarray(c).reshape(units, n)
        if (c < 0).any():
            raise ConfigError("positive counts c must be >= 0")

        self._table = prompt_level_table(n)
        self._c_max = c.max(axis=1).astype(np.float64)  # (U,)
        self._S = S  # kept for S_(k) of new top_k values
        self._top = np.zeros((units, 0), dtype=np.float64)  # (U, K) largest S, descending
        self._by_top_k: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._build(S, c, chunk_units)

    @classmethod
    def from_stats(
        cls, stats: CalibrationStats, layers: LayerRange | str | Sequence[int] | None = None
    ) -> LevelsIndex:
        """Index the sparse ``layers`` of ``stats`` (default: the model's default range,
        as everywhere in autosparse; they must all be recorded)."""
        from autosparse.engine.config import resolve_layers

        chosen = resolve_layers(layers, stats.num_layers)
        picked = stats.select_layers(chosen)
        return cls(picked.S, picked.c, picked.layers)

    # -- precomputation ------------------------------------------------------------

    def _build(self, S: np.ndarray, c: np.ndarray, chunk_units: int) -> None:
        units, n = S.shape
        total = units * n
        # Neurons sorted by (unit, count, S): position = unit * n + rank. There is one
        # cell per neuron, numbered like positions: group g's cells are its positions.
        self._vals = np.empty(total + 1, dtype=np.int32)  # float32 bits of S, sorted
        self._cells = np.empty(total, dtype=np.int64)  # cell words, see below
        self._vals[total] = 0x7FFFFFFF  # sentinel: searches may read one past the end
        parts: list[tuple[np.ndarray, ...]] = []
        for u0 in range(0, units, chunk_units):
            u1 = min(units, u0 + chunk_units)
            offset, m = u0 * n, (u1 - u0) * n
            # One int64 key per neuron: the count in the high bits, the float32 bits of S
            # in the low 31 (order-preserving for S >= 0; "+ 0" turns -0.0 into 0.0).
            bits = (S[u0:u1] + np.float32(0)).view(np.int32)
            key = (c[u0:u1].astype(np.int64) << 31) | bits
            key.sort(axis=1)
            key = key.ravel()
            vals = (key & 0x7FFFFFFF).astype(np.int32)
            count = key >> 31
            new = np.empty(m, dtype=bool)
            new[0] = True
            np.not_equal(count[1:], count[:-1], out=new[1:])
            new[::n] = True  # a unit starts a group
            starts = np.flatnonzero(new)
            size = np.diff(np.append(starts, m))
            lo = vals[starts].astype(np.float64)
            scale = size / (vals[starts + size - 1] - lo + 1)
            last = (size - 1).astype(np.float64)
            cell = starts.repeat(size) + _cell_of(
                vals, lo.repeat(size), scale.repeat(size), last.repeat(size)
            )
            per_cell = np.bincount(cell, minlength=m)
            cell_start = np.cumsum(per_cell) - per_cell
            first = np.where(per_cell > 0, vals[np.minimum(cell_start, m - 1)], 0x7FFFFFFF)
            # cell word: start position (high 32 bits) | holds 2+ neurons (bit 31) |
            # float32 bits of its first S (or 0x7FFFFFFF when empty: above every query)
            self._cells[offset : offset + m] = (
                ((cell_start + offset) << 32) | ((per_cell >= 2).astype(np.int64) << 31) | first
            )
            self._vals[offset : offset + m] = vals
            parts.append((starts + offset, size, count[starts], lo, scale, last))
        g_start, g_size, g_count, self._g_lo, self._g_scale, self._g_last = (
            np.concatenate(column) for column in zip(*parts, strict=True)
        )
        self._g_start = g_start
        self._g_size = g_size
        self._g_end = g_start + g_size
        # smallest and largest S of each group, as float64 values
        self._g_min = self._vals[g_start].view(np.float32).astype(np.float64)
        self._g_max = self._vals[self._g_end - 1].view(np.float32).astype(np.float64)
        self._g_unit = g_start // n
        self._g_zero = g_count == 0
        c_max = self._c_max[self._g_unit]
        with np.errstate(divide="ignore", invalid="ignore"):
            self._g_norm = np.where(c_max > 0, g_count / c_max, 0.0)  # n_i of the group
        self._unit_first = np.flatnonzero(
            np.concatenate(([True], self._g_unit[1:] != self._g_unit[:-1]))
        )

    def _s_k(self, top_k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(S_(k) per group, mask of groups whose unit has S_(k) = 0 or None)."""
        k = min(int(top_k), self.num_neurons)
        cached = self._by_top_k.get(k)
        if cached is not None:
            return cached
        if k > self._top.shape[1]:
            keep = min(self.num_neurons, max(k, 2 * self._top.shape[1], 128))
            part = -np.partition(-self._S, keep - 1, axis=1)[:, :keep]
            self._top = -np.sort(-part.astype(np.float64), axis=1)
        s_k = self._top[:, k - 1][self._g_unit]  # (G,)
        dead = s_k == 0
        result = (s_k, dead if dead.any() else None)
        self._by_top_k[k] = result
        return result

    @property
    def num_groups(self) -> int:
        """(unit, count) groups: what the cost of a setting grows with."""
        return int(self._g_start.size)

    @property
    def nbytes(self) -> int:
        """Memory held by the index's own arrays (the S it was built from not included)."""
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray)) - int(
            self._S.nbytes
        )

    # -- one setting ---------------------------------------------------------------

    def counts(self, w_sum: float, w_count: float, threshold: float, top_k: int) -> np.ndarray:
        """#{i : score_i > threshold} per prompt and layer: (P, L) int64."""
        check_setting(w_sum, w_count, threshold, top_k)
        threshold = float(threshold) + 0.0  # -0.0 -> 0.0
        s_k, dead = self._s_k(top_k)
        if w_sum > 0:
            # t = S_(k) * (threshold - w_count * n) / w_sum, per group; never nan
            t = self._g_norm * -float(w_count)
            t += threshold
            t *= s_k
            t /= w_sum
            if dead is not None:
                # S_(k) = 0: s_i = +inf for S_i > 0 (groups with c >= 1), 0 for S_i = 0
                t[dead & ~self._g_zero] = -1.0
                t[dead & self._g_zero] = -1.0 if threshold < 0 else 1.0
        else:
            t = np.where(w_count * self._g_norm > threshold, -1.0, np.inf)
        # Groups wholly above or below their threshold are settled by the group's
        # smallest and largest S. When few groups straddle their threshold, only those
        # are looked up; when most do, all are (the lookup is exact for every group,
        # and it saves gathering the straddlers out).
        every = t < self._g_min
        straddles = (t < self._g_max) ^ every
        if 2 * np.count_nonzero(straddles) > straddles.size:
            above = self._g_end - self._position(t)
        else:
            above = np.where(every, self._g_size, 0)
            some = np.flatnonzero(straddles)
            if some.size:
                above[some] = self._g_end[some] - self._position(t[some], some)
        return np.add.reduceat(above, self._unit_first).reshape(self.num_prompts, len(self.layers))

    def _position(self, t: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
        """Position of the first S above t in each of ``groups`` (default: all groups);
        t is changed in place."""
        g = slice(None) if groups is None else groups
        t += 0.0  # -0.0 -> 0.0
        # q: bits of the largest float32 <= t, so that "S > t" <=> bits(S) > q. A negative
        # t gives a negative q (every S is above); t beyond float32 gives inf's bits.
        with np.errstate(over="ignore"):
            f = t.astype(np.float32)
        q = f.view(np.int32).astype(np.int64)
        q -= f > t
        cell = self._g_start[g] + _cell_of(q, self._g_lo[g], self._g_scale[g], self._g_last[g])
        word = np.take(self._cells, cell)
        pos = word >> 32  # the cell's start: every S before it is <= q, every S after > q
        low = word & 0xFFFFFFFF
        below = (low & 0x7FFFFFFF) <= q  # the cell's first S is not above t
        pos += below
        more = np.flatnonzero(below & (low > 0x7FFFFFFF))  # and the cell holds more
        if more.size:
            # Search up to the group's end: every S in a later cell is above q anyway.
            end = self._g_end[more] if groups is None else self._g_end[groups[more]]
            pos[more] = self._search(pos[more], end, q[more])
        return pos

    def _search(self, lo: np.ndarray, hi: np.ndarray, q: np.ndarray) -> np.ndarray:
        """First position in [lo, hi) whose value is above q, for each row (vectorized).

        Most cells that need a search hold two or three neurons, so it steps forward a
        few times, keeping only the rows still going, and bisects what is left."""
        pos = lo.copy()
        rows = np.arange(lo.size)
        for _ in range(3):
            going = np.flatnonzero((lo < hi) & (np.take(self._vals, lo) <= q))
            pos[rows] = lo  # rows that stopped are done
            if going.size == 0:
                return pos
            rows, lo, hi, q = rows[going], lo[going] + 1, hi[going], q[going]
        while True:
            active = lo < hi
            if not active.any():
                break
            mid = (lo + hi) >> 1
            up = (np.take(self._vals, mid) <= q) & active
            lo = np.where(up, mid + 1, lo)
            hi = np.where(up | ~active, hi, mid)
        pos[rows] = lo
        return pos

    def hundredths(self, w_sum: float, w_count: float, threshold: float, top_k: int) -> np.ndarray:
        """Per-layer levels in integer hundredths: (L,) int64."""
        counts = self.counts(w_sum, w_count, threshold, top_k)
        return _layer_hundredths(self._table[counts])

    def evaluate(
        self, w_sum: float, w_count: float, threshold: float, top_k: int = DEFAULT_TOP_K
    ) -> LevelsResult:
        """The levels of one setting."""
        h = self.hundredths(w_sum, w_count, threshold, top_k)
        return self._result(h, w_sum, w_count, threshold, top_k)

    def _result(self, h, w_sum, w_count, threshold, top_k, goal=None) -> LevelsResult:
        return LevelsResult(
            levels=tuple(float(x) / 100 for x in h),
            mean=float(h.sum()) / (100 * len(h)),
            w_sum=float(w_sum),
            w_count=float(w_count),
            threshold=float(threshold),
            top_k=int(top_k),
            layers=self.layers,
            goal=goal,
        )

    # -- goal solving --------------------------------------------------------------

    def solve_goal(
        self,
        goal: float,
        w_sum: float,
        w_count: float | None = None,
        top_k: int = DEFAULT_TOP_K,
    ) -> LevelsResult:
        """The threshold whose mean level comes closest to ``goal`` (a mean keep ratio in
        (0, 1]), with its levels. ``w_count`` defaults to ``1 - w_sum``.

        The mean is a non-increasing step function of the threshold; bisection brackets
        the step across the goal, and the closer of its two sides wins (on a tie, the
        lower threshold, i.e. the higher mean). The returned mean is the mean of the
        returned levels, which the returned threshold produces. The threshold is then
        shortened to the fewest decimals that give the same levels."""
        if not (0.0 < goal <= 1.0):
            raise ConfigError(f"goal {goal} is not a mean keep ratio in (0, 1]")
        if w_count is None:
            w_count = round(1.0 - w_sum, 10)
        check_setting(w_sum, w_count, 0.0, top_k)
        total = 100 * len(self.layers)
        target = goal * total  # compare sums of hundredths, not floats

        def mean_sum(th: float) -> tuple[int, np.ndarray]:
            h = self.hundredths(w_sum, w_count, th, top_k)
            return int(h.sum()), h

        lo, (lo_sum, lo_h) = -1.0, mean_sum(-1.0)  # every neuron counts: mean 1
        hi = self._max_score(w_sum, w_count, top_k) + 1.0
        hi_sum, hi_h = mean_sum(hi)
        if hi_sum >= target:  # even the largest threshold keeps at least the goal
            lo, lo_sum, lo_h = hi, hi_sum, hi_h
        else:
            while True:
                mid = (lo + hi) / 2
                if not (lo < mid < hi):
                    break
                mid_sum, mid_h = mean_sum(mid)
                if mid_sum == target:
                    lo, lo_sum, lo_h = mid, mid_sum, mid_h
                    break
                if mid_sum > target:
                    lo, lo_sum, lo_h = mid, mid_sum, mid_h
                else:
                    hi, hi_sum, hi_h = mid, mid_sum, mid_h
        if hi_sum < target and abs(hi_sum - target) < abs(lo_sum - target):
            best, best_h = hi, hi_h
        else:
            best, best_h = lo, lo_h
        best = self._short_threshold(best, best_h, w_sum, w_count, top_k)
        return self._result(best_h, w_sum, w_count, best, top_k, goal=float(goal))

    def _max_score(self, w_sum: float, w_count: float, top_k: int) -> float:
        """The largest finite score of any neuron (0 for a unit with S_(k) = 0)."""
        self._s_k(top_k)
        s_k = self._top[:, min(int(top_k), self.num_neurons) - 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(s_k > 0, self._top[:, 0] / s_k, 0.0)
        return float(w_sum * ratio.max() + w_count)

    def _short_threshold(self, th, h, w_sum, w_count, top_k) -> float:
        for decimals in range(1, 13):
            short = round(th, decimals)
            if short == th:
                return th
            if np.array_equal(self.hundredths(w_sum, w_count, short, top_k), h):
                return short
        return th

    # -- the tuner's LevelsSource protocol ------------------------------------------

    def levels(self, w_sum: float, w_count: float, threshold: float, top_k: int) -> list[float]:
        return list(self.evaluate(w_sum, w_count, threshold, top_k).levels)

    def solve(
        self, w_sum: float, w_count: float, top_k: int, goal: float
    ) -> tuple[float, list[float]]:
        result = self.solve_goal(goal, w_sum, w_count, top_k)
        return result.threshold, list(result.levels)


def _cell_of(bits: np.ndarray, lo: np.ndarray, scale: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Cell number of S bits (or a query q) inside its group: even cells over the bits.
    Build and query must use this same expression: it is monotone in ``bits``, which is
    all the lookup relies on."""
    cell = (bits - lo) * scale
    np.clip(cell, 0.0, last, out=cell)
    return cell.astype(np.int64)


# --------------------------------------------------------------------------- AVG


def average_levels(vectors: Sequence[Sequence[float]]) -> list[float]:
    """The seed's AVG: element-wise mean of level vectors, rounded to 2 decimals.

    The mean is computed on the decimal values as written (``str(x)``) and rounded half
    to even, so [0.15] and [0.16] average to 0.16, not to float noise's 0.15."""
    vectors = [list(v) for v in vectors]
    if not vectors:
        raise ConfigError("no level vectors to average")
    width = len(vectors[0])
    if any(len(v) != width for v in vectors):
        raise ConfigError(
            "level vectors of different lengths: " + ", ".join(str(len(v)) for v in vectors)
        )
    out = []
    for column in zip(*vectors, strict=True):
        total = sum((Decimal(str(float(x))) for x in column), Decimal(0))
        mean = (total / len(column)).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)
        out.append(float(mean))
    return out


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class LevelsFile:
    """A levels vector as read from a file. ``layers`` ("START:STOP") and the metadata
    are None/empty for the reference's plain per-layer lists."""

    levels: list[float]
    layers: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    goal: float | None = None
    mean: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def write_levels_file(
    path: str | os.PathLike,
    levels: Sequence[float] | LevelsResult,
    *,
    model: str | None = None,
    layers: str | Sequence[int] | None = None,
    params: dict[str, Any] | None = None,
    goal: float | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a levels vector as JSON with its metadata. A LevelsResult brings its own
    layers, parameters and goal (explicit arguments win). Every level must be in (0, 1].
    The mean written is the mean of the levels written."""
    if isinstance(levels, LevelsResult):
        result = levels
        levels = list(result.levels)
        layers = layers if layers is not None else (result.layer_range or list(result.layers))
        params = params if params is not None else result.params
        goal = goal if goal is not None else result.goal
    values = _check_levels([float(x) for x in levels], str(path))
    layer_text = _layers_text(layers, len(values))
    doc = {
        "format": FILE_FORMAT,
        "version": 1,
        "model": model,
        "layers": layer_text,
        "levels": values,
        "mean": sum(values) / len(values),
        "goal": goal,
        "params": dict(params or {}),
        **(extra or {}),
    }
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def read_levels_file(path: str | os.PathLike) -> LevelsFile:
    """Read a levels file: autosparse's JSON, a JSON list of numbers, or text with one
    number per line or comma-separated (the reference's plain per-layer list).
    ConfigError (one line) for a missing, unreadable or invalid file, or a level
    outside (0, 1]."""
    name = str(path)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"cannot read levels file {name}: {reason}") from None
    text = text.strip()
    if not text:
        raise ConfigError(f"levels file {name} is empty")
    if text[0] in "{[":
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"levels file {name} is not valid JSON: {exc}") from None
    else:
        doc = _plain_numbers(text, name)
    if isinstance(doc, list):
        return LevelsFile(levels=_check_levels(doc, name))
    if not isinstance(doc, dict) or "levels" not in doc:
        raise ConfigError(f"levels file {name} has no 'levels' list")
    if doc.get("format", FILE_FORMAT) != FILE_FORMAT:
        raise ConfigError(f"levels file {name} has format {doc.get('format')!r}, not {FILE_FORMAT}")
    values = _check_levels(doc["levels"], name)
    layers = doc.get("layers")
    if layers is not None:
        layers = _layers_text(layers, len(values), name)
    params = doc.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"levels file {name}: 'params' must be an object")
    known = {"format", "version", "model", "layers", "levels", "mean", "goal", "params"}
    return LevelsFile(
        levels=values,
        layers=layers,
        params=params,
        model=doc.get("model"),
        goal=_optional_float(doc.get("goal"), "goal", name),
        mean=_optional_float(doc.get("mean"), "mean", name),
        extra={k: v for k, v in doc.items() if k not in known},
    )


def _plain_numbers(text: str, name: str) -> list[float]:
    out = []
    for token in re.split(r"[\s,;]+", text):
        if not token:
            continue
        try:
            out.append(float(token))
        except ValueError:
            raise ConfigError(f"levels file {name}: {token!r} is not a number") from None
    return out


def _check_levels(values: Any, name: str) -> list[float]:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"levels file {name}: 'levels' must be a non-empty list of numbers")
    out = []
    for i, x in enumerate(values):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise ConfigError(f"levels file {name}: entry {i} ({x!r}) is not a number")
        if not (0.0 < float(x) <= 1.0):
            raise ConfigError(
                f"levels file {name}: entry {i} is {x}, outside (0, 1] (a keep ratio per layer)"
            )
        out.append(float(x))
    return out


def _layers_text(layers: Any, count: int, name: str | None = None) -> str | None:
    """Normalize a layer range to "START:STOP" and check it has ``count`` layers."""
    from autosparse.engine.config import LayerRange

    where = f"levels file {name}: " if name else ""
    if layers is None:
        return None
    if isinstance(layers, LayerRange):
        rng = layers
    elif isinstance(layers, str):
        try:
            rng = LayerRange.parse(layers)
        except ConfigError as exc:
            raise ConfigError(f"{where}{exc}") from None
    else:
        try:
            text = layer_range_text([int(i) for i in layers])
        except (TypeError, ValueError):
            text = None
        if text is None:
            raise ConfigError(f"{where}layers {layers!r} are not a contiguous range START:STOP")
        rng = LayerRange.parse(text)
    if rng.stop - rng.start != count:
        raise ConfigError(
            f"{where}layer range {rng} has {rng.stop - rng.start} layers but there are "
            f"{count} levels"
        )
    return str(rng)


def _optional_float(value: Any, what: str, name: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError, InvalidOperation):
        raise ConfigError(f"levels file {name}: {what} {value!r} is not a number") from None
