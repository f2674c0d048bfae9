"""The free search space: the per-layer keep vector itself, searched at a fixed mean.

A vector holds one keep ratio per sparse layer, each on a grid (``low + k * step``)
within ``[low, high]``, and its mean over the sparse layers is the goal by
construction. Internally a vector is its grid indices ``k``; the budget is their sum,
fixed by the goal. The only move is EvoPress's level switch: one layer gives one grid
step to another, so every vector the search visits keeps the budget exactly.

The search is a steady-state (1 + lambda) evolution: every new trial is a child of the
best finished trial so far (its parent), made by a few level switches. ``FreeSampler``
runs it as an Optuna sampler whose state is read from the study's storage on every
proposal, so several workers, a resumed study and the dashboard see one study.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.samplers import BaseSampler
from optuna.trial import TrialState

from autosparse.errors import ConfigError

#: the largest |mean - goal| a free-space vector may have
MEAN_TOLERANCE = 0.005
#: decimals a grid value is rounded to (grid steps are far coarser)
DECIMALS = 10
#: trial system attributes: the parent's trial number and the child's number of moves
PARENT_ATTR = "autosparse:parent"
MOVES_ATTR = "autosparse:moves"


@dataclass(frozen=True)
class KeepGrid:
    """The values a layer's keep ratio may take: ``low + k * step`` for k in 0..top."""

    step: float = 0.025
    low: float = 0.05
    high: float = 1.0

    def __post_init__(self) -> None:
        if not self.step > 0:
            raise ConfigError(f"grid step {self.step} must be positive")
        if not (0.0 < self.low < self.high <= 1.0):
            raise ConfigError(
                f"keep bounds [{self.low:g}, {self.high:g}] must satisfy 0 < low < high <= 1"
            )
        span = (self.high - self.low) / self.step
        if abs(span - round(span)) > 1e-6:
            raise ConfigError(
                f"the keep bounds [{self.low:g}, {self.high:g}] are not a whole number of "
                f"grid steps of {self.step:g}"
            )

    @property
    def top(self) -> int:
        """The largest grid index (the one of ``high``)."""
        return round((self.high - self.low) / self.step)

    def value(self, k: int) -> float:
        return round(self.low + k * self.step, DECIMALS)

    def index(self, x: float) -> int:
        """The index of the grid value nearest ``x``, clipped to the bounds."""
        return min(self.top, max(0, round((float(x) - self.low) / self.step)))

    def budget(self, n: int, goal: float) -> int:
        """The index sum of an ``n``-layer vector whose mean is nearest ``goal``.
        ConfigError when no vector on this grid has a mean within MEAN_TOLERANCE."""
        if n < 1:
            raise ConfigError("the free space needs at least one sparse layer")
        total = min(n * self.top, max(0, round(n * (goal - self.low) / self.step)))
        achieved = self.low + total * self.step / n
        if abs(achieved - goal) > MEAN_TOLERANCE + 1e-12:
            raise ConfigError(
                f"no keep vector of {n} layers on a {self.step:g} grid in "
                f"[{self.low:g}, {self.high:g}] has a mean within {MEAN_TOLERANCE:g} of the goal "
                f"{goal:g} (nearest {achieved:.4f}); use a finer --grid or wider bounds"
            )
        return total

    def values(self, ks: Sequence[int]) -> list[float]:
        return [self.value(k) for k in ks]

    def indices(self, xs: Sequence[float]) -> list[int]:
        return [self.index(x) for x in xs]


def project_to_grid(levels: Sequence[float], goal: float, grid: KeepGrid) -> list[float]:
    """The grid vector nearest ``levels`` whose mean is within MEAN_TOLERANCE of ``goal``.

    Each value is rounded to the grid (clipped to the bounds); then whole steps are added
    to the layers rounded down the most, or taken from those rounded up the most, until
    the index sum is the goal's budget. Ties go to the lower layer. Deterministic."""
    xs = [float(x) for x in levels]
    budget = grid.budget(len(xs), goal)
    ks = grid.indices(xs)
    while sum(ks) != budget:
        # residual: how far the wanted value lies above the current grid value, in steps
        residual = [(x - grid.value(k)) / grid.step for x, k in zip(xs, ks, strict=True)]
        if sum(ks) < budget:
            open_ = [i for i, k in enumerate(ks) if k < grid.top]
            i = max(open_, key=lambda j: (residual[j], -j))
            ks[i] += 1
        else:
            open_ = [i for i, k in enumerate(ks) if k > 0]
            i = min(open_, key=lambda j: (residual[j], j))
            ks[i] -= 1
    return grid.values(ks)


def level_switch(
    levels: Sequence[float], grid: KeepGrid, moves: int, rng: random.Random
) -> list[float]:
    """``levels`` after ``moves`` level switches: each takes one grid step from a layer
    above the lower bound and gives it to another layer below the upper bound, both drawn
    uniformly by ``rng``. The sum (so the mean) is unchanged exactly, the bounds hold."""
    ks = grid.indices(levels)
    n = len(ks)
    for _ in range(moves):
        donors = [i for i in range(n) if ks[i] > 0]
        if not donors:
            raise ConfigError("no layer can give a grid step: every layer is at the lower bound")
        donor = rng.choice(donors)
        receivers = [i for i in range(n) if i != donor and ks[i] < grid.top]
        if not receivers:
            raise ConfigError("no layer can take a grid step: the others are at the upper bound")
        ks[donor] -= 1
        ks[rng.choice(receivers)] += 1
    return grid.values(ks)


@dataclass(frozen=True)
class Proposal:
    """A child vector, the index of its parent in the finished trials given (None when
    there was none: the child of the uniform vector) and its number of moves."""

    levels: list[float]
    parent: int | None
    moves: int


def propose(
    finished: Sequence[tuple[Sequence[float], float]],
    *,
    goal: float,
    grid: KeepGrid,
    n_layers: int,
    max_moves: int,
    rng: random.Random,
    seen: Callable[[tuple[float, ...]], bool] = lambda _: False,
    attempts: int = 20,
) -> Proposal:
    """The next vector of a (1 + lambda) search maximizing the score: a child of the best
    of ``finished`` ((levels, score) pairs), at 1..``max_moves`` level switches drawn by
    ``rng``. Without finished vectors the parent is the uniform vector at ``goal``. A
    child ``seen`` already is drawn again, up to ``attempts`` times."""
    if max_moves < 1:
        raise ConfigError("a child needs at least one move")
    if finished:
        parent = max(range(len(finished)), key=lambda i: (finished[i][1], -i))
        base: Sequence[float] = finished[parent][0]
    else:
        parent, base = None, project_to_grid([goal] * n_layers, goal, grid)
    child, moves = list(base), 1
    for _ in range(attempts):
        moves = rng.randint(1, max_moves)
        child = level_switch(base, grid, moves, rng)
        if child != list(base) and not seen(tuple(child)):
            break
    return Proposal(child, parent, moves)


def param_names(layers: Sequence[int]) -> list[str]:
    """Optuna parameter names of the layers' keep ratios, by absolute layer index."""
    width = max(2, len(str(max(layers, default=0))))
    return [f"keep_{i:0{width}d}" for i in layers]


def starting_vectors(
    goal: float, grid: KeepGrid, n_layers: int, formula: Sequence[float] | None
) -> list[list[float]]:
    """The search's first vectors: CoreInfer's uniform one and, when given, the formula's
    levels projected onto the grid at the goal (dropped when it equals the uniform)."""
    out = [project_to_grid([goal] * n_layers, goal, grid)]
    if formula is not None:
        projected = project_to_grid(formula, goal, grid)
        if projected not in out:
            out.append(projected)
    return out


class FreeSampler(BaseSampler):
    """Proposes free-space vectors (``propose``) for the parameters ``param_names(layers)``.

    Everything it reads comes from the study: the goal (a study attribute) and the
    finished trials, so any worker, now or after a restart, proposes from the same state.
    A trial's randomness is seeded by the study seed and its number. An enqueued trial
    (the starting vectors, a dead worker's retry) keeps its fixed parameters."""

    def __init__(self, layers: Sequence[int], grid: KeepGrid, *, seed: int, max_moves: int):
        self._names = param_names(layers)
        self._grid = grid
        self._seed = seed
        self._max_moves = max_moves
        self._goal: float | None = None
        self._independent = optuna.samplers.RandomSampler(seed=seed)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def distribution(self) -> FloatDistribution:
        g = self._grid
        return FloatDistribution(g.low, g.high, step=g.step)

    def infer_relative_search_space(self, study, trial) -> dict[str, FloatDistribution]:
        return {name: self.distribution() for name in self._names}

    def _study_goal(self, study) -> float:
        if self._goal is None:  # written once by Tuner.prepare, never changed
            self._goal = float(study.user_attrs["goal"])
        return self._goal

    def vector(self, params: dict[str, Any]) -> list[float] | None:
        """A trial's vector from its parameters, or None when it lacks one of them."""
        if not all(n in params for n in self._names):
            return None
        return self._grid.values(self._grid.indices([params[n] for n in self._names]))

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        if not search_space or "fixed_params" in trial.system_attrs:
            return {}
        trials = study.get_trials(deepcopy=False)
        complete = [
            t
            for t in trials
            if t.state == TrialState.COMPLETE
            and t.value is not None
            and math.isfinite(t.value)
            and t.user_attrs.get("feasible", True)
            and self.vector(t.params) is not None
        ]
        seen = {tuple(v) for t in trials if (v := self.vector(t.params)) is not None}
        rng = random.Random(f"{self._seed}:{trial.number}")
        proposal = propose(
            [(self.vector(t.params), float(t.value)) for t in complete],
            goal=self._study_goal(study),
            grid=self._grid,
            n_layers=len(self._names),
            max_moves=self._max_moves,
            rng=rng,
            seen=seen.__contains__,
        )
        parent = None if proposal.parent is None else complete[proposal.parent].number
        storage = study._storage
        storage.set_trial_system_attr(trial._trial_id, PARENT_ATTR, parent)
        storage.set_trial_system_attr(trial._trial_id, MOVES_ATTR, proposal.moves)
        return dict(zip(self._names, proposal.levels, strict=True))

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        # Only a parameter outside the vector gets here (none in this space).
        return self._independent.sample_independent(study, trial, param_name, param_distribution)
