"""The tuning study: the seed's hand-run grid search as one resumable Optuna study.

A trial samples the level parameters (``w_sum``, ``top_k``, and with the
``constrained`` strategy the threshold), turns them into per-layer levels from
cached calibration statistics (milliseconds, no model run), runs sparse
inference on the study's screening sample and returns the task metric's mean.
The screen is a seeded random sample, identical for every trial and for the
CoreInfer and dense baselines, which are evaluated once per study and stored in
it. Studies live in any SQLAlchemy database Optuna supports.

With ``space="free"`` a trial's parameters are the per-layer keep ratios themselves,
proposed by ``free_space.FreeSampler`` at the goal mean (docs/search.md).

The model-facing parts (evaluation, calibration) are behind two small
protocols, ``Evaluator`` and ``LevelsSource``, so the study logic is tested
without a model and the same code drives a tiny model, SmolLM2 or a 3B model.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from autosparse.errors import ConfigError, StorageError
from autosparse.methods import SELECTOR_NAMES, Method
from autosparse.results import EvalResult
from autosparse.stats import mean

STRATEGIES = ("solve", "constrained")
OBJECTIVES = ("task", "fidelity", "kl")
#: formula: the levels formula's parameters; free: the per-layer keep vector itself
SPACES = ("formula", "free")
#: the formula setting whose solved levels seed the free search (w_sum, top_k)
FREE_START = (0.5, 100)
SPEC_ATTR = "autosparse:spec"
#: seconds between a running trial's heartbeats (open_storage)
HEARTBEAT = 60
#: a trial whose heartbeat is this many intervals old belongs to a dead worker
GRACE_HEARTBEATS = 3
#: fields of StudySpec that must match when a study is resumed or joined
IDENTITY_FIELDS = (
    "model_id",
    "task",
    "goal",
    "goal_from_baseline",
    "screen",
    "seed",
    "layers",
    "baseline_keep",
    "token_ratio",
    "strategy",
    "tolerance",
    "metric",
    "num_fewshot",
    "calibration",
    "top_k_choices",
    "threshold_range",
    "couple_w_count",
    "objective",
    "selector",
    "space",
)
#: identity fields of the free space only (a formula study's identity is what it was)
FREE_IDENTITY_FIELDS = ("grid", "keep_range", "max_moves")


@dataclass(frozen=True)
class StudySpec:
    """Everything that defines a study. Validated on construction."""

    model: str  # what the user typed: alias, hub id or folder
    model_id: str  # stable identity of the weights (models.model_identity)
    task: str
    goal: float | None = None
    goal_from_baseline: float | None = None
    screen: int = 100
    seed: int = 42
    layers: str | None = None
    baseline_keep: float = 0.4
    token_ratio: float = 0.2
    strategy: str = "solve"
    tolerance: float = 0.01
    metric: str | None = None
    num_fewshot: int | None = None
    calibration: int = 100
    top_k_choices: tuple[int, ...] = (25, 50, 100, 200, 400)
    threshold_range: tuple[float, float] = (0.0, 1.0)
    couple_w_count: bool = True
    batch_size: int = 1
    prune: bool = True
    objective: str | None = None  # None: kl in the free space, task in the formula space
    #: which neurons every method of the study keeps (the baseline's and the trials')
    selector: str = "coreinfer"
    space: str = "formula"
    grid: float = 0.025
    keep_range: tuple[float, float] = (0.05, 1.0)
    max_moves: int = 3

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ConfigError(f"unknown space {self.space!r}; choose {' or '.join(SPACES)}")
        if self.objective is None:
            object.__setattr__(self, "objective", "kl" if self.space == "free" else "task")
        if (self.goal is None) == (self.goal_from_baseline is None):
            raise ConfigError("give exactly one of --goal and --goal-from-baseline")
        if self.goal is not None and not (0.0 < self.goal <= 1.0):
            raise ConfigError(f"goal {self.goal} is outside (0, 1]: it is a mean keep ratio")
        if self.goal_from_baseline is not None and not (0.0 < self.goal_from_baseline <= 1.0):
            raise ConfigError(f"--goal-from-baseline {self.goal_from_baseline} is outside (0, 1]")
        if not (0.0 < self.baseline_keep <= 1.0):
            raise ConfigError(f"baseline keep {self.baseline_keep} is outside (0, 1]")
        if not (0.0 < self.token_ratio <= 1.0):
            raise ConfigError(f"token ratio {self.token_ratio} is outside (0, 1]")
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"unknown strategy {self.strategy!r}; choose {' or '.join(STRATEGIES)}"
            )
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}"
            )
        if self.selector not in SELECTOR_NAMES:
            raise ConfigError(
                f"unknown selector {self.selector!r}; choose one of {', '.join(SELECTOR_NAMES)}"
            )
        if self.screen < 1:
            raise ConfigError("--screen must be at least 1")
        if self.calibration < 1:
            raise ConfigError("--calibration must be at least 1")
        if not self.top_k_choices or min(self.top_k_choices) < 1:
            raise ConfigError("top_k choices must be positive integers")
        lo, hi = self.threshold_range
        if not lo < hi:
            raise ConfigError(f"bad threshold range {self.threshold_range}")
        if self.tolerance <= 0:
            raise ConfigError("--tolerance must be positive")
        if self.space == "free":
            self.keep_grid()  # checks the grid and its bounds
            if self.max_moves < 1:
                raise ConfigError("--max-moves must be at least 1")

    def keep_grid(self):
        """The free space's grid (free_space.KeepGrid)."""
        from autosparse.free_space import KeepGrid

        return KeepGrid(self.grid, *self.keep_range)

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        keys = IDENTITY_FIELDS + (FREE_IDENTITY_FIELDS if self.space == "free" else ())
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudySpec:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("top_k_choices", "threshold_range", "keep_range"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


def default_study_name(
    model: str,
    task: str,
    goal: float | None,
    from_baseline: float | None,
    selector: str = "coreinfer",
    space: str = "formula",
) -> str:
    """MODEL-TASK-gGOAL (or -bFACTOR), with -griffin appended for GRIFFIN's selector and
    -free for the free search space (a study is tied to one selector and one space;
    the names of CoreInfer studies of the formula are as they always were)."""
    tail = f"g{goal:g}" if goal is not None else f"b{from_baseline:g}"
    if selector != "coreinfer":
        tail += f"-{selector}"
    if space != "formula":
        tail += f"-{space}"
    stem = Path(model).name if ("/" in model and Path(model).exists()) else model
    return f"{stem}-{task}-{tail}".replace("/", "_").replace(" ", "_")


def default_storage(name: str, root: str | Path = "studies") -> str:
    return f"sqlite:///{Path(root) / (name + '.db')}"


# ------------------------------------------------------------------ protocols


class Evaluator(Protocol):
    """Runs a method on given documents of the study's task."""

    metric: str  # the primary metric's name

    def document_ids(self) -> list[int]:
        """Ids of every document of the evaluation split."""

    def run(self, method: Method, ids: Sequence[int]) -> EvalResult:
        """Evaluate ``method`` on exactly the documents ``ids``; per-sample scores in order.
        An evaluator may also have ``prepare(ids)``, called once with the screen."""


class LevelsSource(Protocol):
    """Turns level parameters into per-layer levels from cached calibration statistics."""

    layers: tuple[int, ...]  # the sparse layers' absolute indices, one per level

    def levels(self, w_sum: float, w_count: float, threshold: float, top_k: int) -> list[float]: ...

    def solve(
        self, w_sum: float, w_count: float, top_k: int, goal: float
    ) -> tuple[float, list[float]]:
        """(threshold, levels) whose mean comes closest to ``goal``."""


@dataclass(frozen=True)
class Baseline:
    """A method's result on the screen, stored in the study."""

    label: str
    method: dict[str, Any]
    score: float
    sample_ids: list[int]
    sample_scores: list[float]
    density: float | None
    seconds: float

    @classmethod
    def from_result(cls, label: str, r: EvalResult) -> Baseline:
        return cls(
            label,
            r.method,
            mean(r.sample_scores),
            list(r.sample_ids),
            list(r.sample_scores),
            r.density,
            r.seconds,
        )


def clamp_levels(levels: Sequence[float]) -> list[float]:
    """Levels are rounded to 2 decimals, so a layer can come out at 0.00; the engine needs a
    keep ratio in (0, 1], so such a layer keeps the smallest step, 0.01."""
    return [min(1.0, max(0.01, round(float(x), 2))) for x in levels]


def screen_slices(n: int) -> list[int]:
    """Cumulative sizes of the growing slices a trial reports on: a quarter, a half, all."""
    sizes = sorted({max(1, math.ceil(n / 4)), max(1, math.ceil(n / 2)), n})
    return sizes


# ---------------------------------------------------------------------- study


@dataclass
class TrialReport:
    number: int
    params: dict[str, Any]
    achieved: float | None
    density: float | None
    value: float | None
    state: str
    best: float | None
    best_number: int | None
    vs_baseline: Any = None  # PairedDiff.to_dict() or None
    baseline: str = "CoreInfer"  # whose selection the uniform baseline runs


@dataclass
class Tuner:
    """One worker of one study. ``study`` is an optuna.Study whose user attributes hold the
    spec, the sample ids, the baselines and the goal."""

    study: Any
    spec: StudySpec
    evaluator: Evaluator
    levels: LevelsSource
    method_defaults: dict[str, Any] = field(default_factory=dict)  # mode etc.
    #: study attributes already read: each is written once and never changes, and
    #: reading one from the storage is a database round trip
    _fixed: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def _study_attr(self, key: str) -> Any:
        if key not in self._fixed:
            self._fixed[key] = self.study.user_attrs[key]
        return self._fixed[key]

    # -- set-up -------------------------------------------------------------------
    @property
    def screen_ids(self) -> list[int]:
        return list(self._study_attr("screen_ids"))

    @property
    def goal(self) -> float:
        return float(self._study_attr("goal"))

    def baseline(self, label: str) -> Baseline:
        return Baseline(**self._study_attr(f"baseline:{label}"))

    def coreinfer_method(self) -> Method:
        return Method.coreinfer(
            self.spec.baseline_keep,
            self.spec.token_ratio,
            layers=self.spec.layers,
            selector=self.spec.selector,
            **self.method_defaults,
        )

    def prepare(
        self, screen_ids: Sequence[int], on_status: Callable[[str], None] | None = None
    ) -> None:
        """Store the screen, evaluate the baselines on it once, and fix the goal."""
        say = on_status or (lambda _: None)
        attrs = self.study.user_attrs
        if "screen_ids" not in attrs:
            self.study.set_user_attr("screen_ids", [int(i) for i in screen_ids])
        prepare = getattr(self.evaluator, "prepare", None)
        if prepare is not None:  # build the screen's requests once for every trial
            prepare(self.screen_ids)
        for label, method in (("coreinfer", self.coreinfer_method()), ("dense", Method.dense())):
            if f"baseline:{label}" in self.study.user_attrs:
                continue
            say(f"evaluating the {label} baseline on the {len(self.screen_ids)}-sample screen")
            result = self.evaluator.run(method, self.screen_ids)
            self.study.set_user_attr(
                f"baseline:{label}", asdict(Baseline.from_result(label, result))
            )
        if "goal" not in self.study.user_attrs:
            if self.spec.goal is not None:
                goal = self.spec.goal
            else:
                density = self.baseline("coreinfer").density
                if density is None or not math.isfinite(density):
                    raise ConfigError("CoreInfer's realized density is unknown; give --goal")
                goal = round(self.spec.goal_from_baseline * density, 4)
            self.study.set_user_attr("goal", goal)
        if self.spec.space == "free" and not self.study.trials:
            self._enqueue_starts()

    def _enqueue_starts(self) -> None:
        """Queue the free search's first trials: CoreInfer's uniform vector and the
        formula's levels at a default setting, both on the grid at the goal."""
        from autosparse.free_space import param_names, starting_vectors

        w_sum, top_k = FREE_START
        _, formula = self.levels.solve(w_sum, round(1.0 - w_sum, 10), top_k, self.goal)
        names = param_names(self.levels.layers)
        starts = starting_vectors(self.goal, self.spec.keep_grid(), len(names), formula)
        for label, vector in zip(("uniform", "formula"), starts, strict=False):
            self.study.enqueue_trial(
                dict(zip(names, vector, strict=True)),
                user_attrs={"start": label},
                skip_if_exists=True,
            )

    # -- one trial ----------------------------------------------------------------
    def sample(self, trial) -> tuple[dict[str, Any], list[float], float | None]:
        """Sample parameters; return (params incl. threshold, levels, constraint violation).
        In the free space the parameters are the levels, one ``keep_<layer>`` each."""
        spec = self.spec
        if spec.space == "free":
            return self._sample_free(trial)
        w_sum = trial.suggest_float("w_sum", 0.0, 1.0, step=0.05)
        if spec.couple_w_count:
            w_count = round(1.0 - w_sum, 10)
        else:
            w_count = trial.suggest_float("w_count", 0.0, 1.0, step=0.05)
        top_k = trial.suggest_categorical("top_k", list(spec.top_k_choices))
        if spec.strategy == "solve":
            threshold, levels = self.levels.solve(w_sum, w_count, int(top_k), self.goal)
            violation = None
        else:
            lo, hi = spec.threshold_range
            threshold = trial.suggest_float("threshold", lo, hi, step=0.01)
            levels = self.levels.levels(w_sum, w_count, threshold, int(top_k))
            violation = abs(mean(clamp_levels(levels)) - self.goal) - spec.tolerance
        params = {
            "w_sum": w_sum,
            "w_count": w_count,
            "threshold": float(threshold),
            "top_k": int(top_k),
        }
        return params, clamp_levels(levels), violation

    def _sample_free(self, trial) -> tuple[dict[str, Any], list[float], float | None]:
        from autosparse.free_space import MEAN_TOLERANCE, param_names

        grid = self.spec.keep_grid()
        names = param_names(self.levels.layers)
        levels = [
            grid.value(grid.index(trial.suggest_float(n, grid.low, grid.high, step=grid.step)))
            for n in names
        ]
        # The sampler keeps the mean by construction; a vector enqueued by hand may not.
        off = abs(mean(levels) - self.goal) - MEAN_TOLERANCE
        return dict(zip(names, levels, strict=True)), levels, (off if off > 1e-9 else None)

    def objective(self, trial) -> float:
        import optuna

        from autosparse.stats import paired_difference

        t0 = time.perf_counter()
        params, levels, violation = self.sample(trial)
        achieved = mean(levels)
        trial.set_user_attr("params", params)
        trial.set_user_attr("levels", levels)
        trial.set_user_attr("achieved_mean", achieved)
        # (the goal is the study's attribute; a trial without "feasible" met it: each
        # attribute is a storage round trip, paid by every trial)
        if violation is not None:
            trial.set_constraint("goal", violation)
            trial.set_user_attr("feasible", violation <= 0)
            if violation > 0:
                # The seed's grid discarded such settings before any model run; so do we.
                trial.set_user_attr("skipped", "mean level outside the goal tolerance")
                raise optuna.TrialPruned()

        method = Method.levels(
            levels,
            self.spec.token_ratio,
            layers=self.spec.layers,
            selector=self.spec.selector,
            params=params,
            **self.method_defaults,
        )
        screen = self.screen_ids
        ids: list[int] = []
        scores: list[float] = []
        densities: list[tuple[float, int]] = []
        model_seconds = 0.0
        for step, size in enumerate(screen_slices(len(screen))):
            chunk = screen[len(ids) : size]
            result = self.evaluator.run(method, chunk)
            model_seconds += result.seconds
            ids += [int(i) for i in result.sample_ids]
            scores += [float(s) for s in result.sample_scores]
            if result.density is not None:
                densities.append((result.density, len(chunk)))
            value = mean(scores)
            trial.report(value, step)
            if size < len(screen) and self.spec.prune and trial.should_prune():
                trial.set_user_attr("pruned_at", len(ids))
                self._record(trial, ids, scores, densities, model_seconds, t0)
                raise optuna.TrialPruned()

        base = self.baseline("coreinfer")
        diff = paired_difference(
            ids, scores, base.sample_ids, base.sample_scores, seed=self.spec.seed
        )
        # The full dict (sd and the power figures too); trials stored before it held only
        # mean, low, high and n, and PairedDiff.from_dict reads both.
        trial.set_user_attr("vs_coreinfer", diff.to_dict())
        self._record(trial, ids, scores, densities, model_seconds, t0)
        return mean(scores)

    def _record(self, trial, ids, scores, densities, model_seconds, t0) -> None:
        total = sum(n for _, n in densities)
        density = sum(d * n for d, n in densities) / total if total else None
        trial.set_user_attr("sample_ids", ids)
        trial.set_user_attr("sample_scores", scores)
        trial.set_user_attr("density", density)
        trial.set_user_attr("model_seconds", model_seconds)
        trial.set_user_attr("seconds", time.perf_counter() - t0)

    # -- the loop -----------------------------------------------------------------
    def run(
        self,
        trials: int,
        timeout: float | None = None,
        on_trial: Callable[[TrialReport], None] | None = None,
        on_status: Callable[[str], None] | None = None,
    ) -> int:
        """Run trials until the study holds ``trials`` finished ones (or ``timeout`` seconds
        pass). Returns how many this worker ran. Several workers may share a study.

        Trials running on other workers count towards the target, as they will finish. When
        only they stand between the study and its target, the worker waits for them, at
        most the storage's grace period: a dead worker's trial (a crash, ``kill -9``) then
        has a stale heartbeat, is failed, and its retry is run here. A live worker's trial
        keeps its heartbeat fresh and is never failed."""
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        waiting = TrialState.WAITING
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        ran = 0
        while True:
            # A dead worker's RUNNING trial must not count towards the target: fail it
            # now (its retry is queued) instead of waiting for the next trial request.
            fail_stale_trials(self.study)
            done, running = self._progress()
            if done >= trials:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            if done + len(running) >= trials:
                if self._wait_for_running(running, deadline, on_status):
                    continue
                break
            # (a queued trial, such as a dead worker's retry, is the one optimize runs next)
            before = {t.number for t in self.study.get_trials(deepcopy=False) if t.state != waiting}
            self.study.optimize(self.objective, n_trials=1, catch=(), gc_after_trial=False)
            ran += 1
            if on_trial is not None:
                new = [
                    t
                    for t in self.study.get_trials(deepcopy=False)
                    if t.number not in before and t.state.is_finished()
                ]
                if new:
                    on_trial(self.trial_report(new[-1]))
        return ran

    def _progress(self) -> tuple[int, set[int]]:
        """(finished trials, numbers of the RUNNING ones) of the study."""
        from optuna.trial import TrialState

        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        trials = self.study.get_trials(deepcopy=False, states=states)
        running = {t.number for t in trials if t.state == TrialState.RUNNING}
        return len(trials) - len(running), running

    def _wait_for_running(
        self,
        numbers: set[int],
        deadline: float | None,
        on_status: Callable[[str], None] | None,
    ) -> bool:
        """Wait until one of the RUNNING trials ``numbers`` leaves that state (it finished,
        or its heartbeat went stale and it was failed, its retry queued): True. False at
        once without heartbeats, and after the grace period if they all still run: their
        workers are alive and will finish them."""
        from optuna.storages import fail_stale_trials

        storage = self.study._storage
        get_interval = getattr(storage, "get_heartbeat_interval", None)
        interval = get_interval() if get_interval is not None else None
        if not interval:
            return False
        # (a study wraps the RDB storage, which alone knows the grace period; Optuna's
        # default is 2 intervals, so waiting 3 when it is unknown is never too short)
        backend = getattr(storage, "_backend", storage)
        grace = getattr(backend, "grace_period", None) or GRACE_HEARTBEATS * interval
        # A dead worker's last heartbeat is no later than now, so it is stale once it is
        # `grace` old (plus a second: SQLite keeps whole seconds) by the database's clock.
        waited = grace + 2
        limit = time.monotonic() + waited
        if deadline is not None:
            limit = min(limit, deadline)
        if on_status is not None:
            shown = ", ".join(f"#{n}" for n in sorted(numbers))
            on_status(
                f"waiting up to {waited:.0f} s for trial {shown}, running on another worker "
                "or left by a dead one (then it is failed and run again)"
            )
        while True:
            now = time.monotonic()
            if now >= limit:
                return False
            time.sleep(min(float(interval), 5.0, limit - now))
            fail_stale_trials(self.study)
            if not numbers <= self._progress()[1]:
                return True

    def trial_report(self, t) -> TrialReport:
        best = best_trial(self.study)
        return TrialReport(
            number=t.number,
            params=t.user_attrs.get("params", t.params),
            achieved=t.user_attrs.get("achieved_mean"),
            density=t.user_attrs.get("density"),
            value=t.value,
            state=t.state.name,
            best=None if best is None else best.value,
            best_number=None if best is None else best.number,
            vs_baseline=t.user_attrs.get("vs_coreinfer"),
            baseline="GRIFFIN" if self.spec.selector == "griffin" else "CoreInfer",
        )


def best_trial(study):
    """The best feasible complete trial, or None."""
    try:
        return study.best_trial
    except ValueError:
        return None


def finished_trials(study, *, select: str = "mean") -> list:
    """Complete, feasible trials, best first. ``select="lcb"`` ranks by the lower bound of
    the paired interval against CoreInfer instead of the raw mean."""
    from optuna.trial import TrialState

    rows = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("feasible", True) and all(v <= 0 for v in t.constraints.values())
    ]
    if select == "lcb":
        key = lambda t: (t.user_attrs.get("vs_coreinfer") or {}).get("low", float("-inf"))  # noqa: E731
    elif select == "mean":
        key = lambda t: t.value  # noqa: E731
    else:
        raise ConfigError(f"unknown selection {select!r}; choose mean or lcb")
    return sorted(rows, key=key, reverse=True)


# --------------------------------------------------------------------- storage


def open_storage(url: str, *, heartbeat: int | None = HEARTBEAT):
    """An Optuna RDB storage opened through ``autosparse.storage`` (the result store's
    rules: timeouts, driver, write-ahead log, creation races). With ``heartbeat`` seconds,
    a running trial records a heartbeat that often, and one silent for ``3 * heartbeat``
    seconds belongs to a dead worker: it is failed and rerun with the same parameters (up
    to twice). Raises StorageError in one line when the database cannot be opened."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    from autosparse import storage

    location = storage.prepare(url)
    kw: dict[str, Any] = {}
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if heartbeat:
        kw = {
            "heartbeat_interval": heartbeat,
            "grace_period": GRACE_HEARTBEATS * heartbeat,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=2),
        }
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def create() -> RDBStorage:
        try:
            return RDBStorage(location.rendered(), engine_kwargs=location.engine_kwargs(), **kw)
        except RuntimeError as exc:  # Optuna's tables are of another schema version
            raise location.error(exc) from exc

    rdb = storage.initialize(location, create)
    storage.write_ahead_log(rdb.engine, location)
    storage.immediate_transactions(rdb.engine, location)
    return rdb


def load_existing(storage, name: str):
    """The study ``name`` in ``storage``, or None if it does not exist."""
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def check_spec(study, spec: StudySpec) -> None:
    """Refuse to resume a study created for another model, task or setting."""
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        return
    theirs = StudySpec.from_dict(stored).identity()
    ours = spec.identity()
    # (the space first: the other fields of a study of another space differ because of it)
    keys = sorted({**theirs, **ours}, key=lambda k: k != "space")
    diffs = [k for k in keys if theirs.get(k) != ours.get(k)]
    if diffs:
        k = diffs[0]
        raise StorageError(
            f"study {study.study_name!r} was created with {k}={theirs.get(k)!r}, not {ours.get(k)!r}; "
            "use another --study name or the original settings"
        )


def create_or_resume(storage, name: str, spec: StudySpec, layers: Sequence[int] | None = None):
    """Create the study (stamped with its spec) or resume it after checking the spec.
    The free space needs the sparse ``layers`` (absolute indices): its parameters."""
    import optuna
    from optuna.pruners import NopPruner, SuccessiveHalvingPruner

    existing = load_existing(storage, name)
    if existing is not None:
        check_spec(existing, spec)
    if spec.space == "free":
        from autosparse.free_space import FreeSampler

        if not layers:
            raise ConfigError("the free space needs the sparse layers of the model")
        sampler = FreeSampler(layers, spec.keep_grid(), seed=spec.seed, max_moves=spec.max_moves)
    else:
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=8)
    pruner = (
        SuccessiveHalvingPruner(min_resource=1, reduction_factor=2) if spec.prune else NopPruner()
    )
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    if SPEC_ATTR not in study.user_attrs:
        study.set_user_attr(SPEC_ATTR, spec.to_dict())
    return study


def reference_grid(
    goal: float, levels: LevelsSource, *, relu: bool = False, tolerance: float = 0.01
) -> list[dict[str, Any]]:
    """The seed's grid points whose mean level is within ``tolerance`` of the goal (its
    "hits"), as parameter dicts ready to enqueue (``top_k`` 100)."""
    if relu:
        w_sums = [round(0.1 + 0.05 * i, 2) for i in range(19)]
        thresholds = [round(0.01 + 0.01 * i, 2) for i in range(10)]
    else:
        w_sums = [round(0.1 + 0.05 * i, 2) for i in range(18)]
        thresholds = [round(0.15 + 0.01 * i, 2) for i in range(36)]
    hits = []
    for w in w_sums:
        for th in thresholds:
            lv = clamp_levels(levels.levels(w, round(1 - w, 10), th, 100))
            if abs(mean(lv) - goal) <= tolerance:
                hits.append({"w_sum": w, "threshold": th, "top_k": 100})
    return hits
