"""Search cost: how many trials and how much wall time each study took to reach its final
fitness, and a common target every study reached, read from the studies' storage.

    python benchmarks/search_cost.py --storage sqlite:///studies/evidence.db \
        STUDY [STUDY...] [--plot search-cost.png] [--json]

Every study is read as stored (nothing is re-run): finished trials in the order they
completed, each trial's own ``seconds`` attribute (the time its evaluation took) and the
study's wall clock from the first trial's start to each completion. A study's *final
fitness* is its best value; the *common target* is the lowest of the studies' best values
(all are maximized), the level every study reached, so that searches with different final
values are compared at the same quality. Pruned trials count as trials and their time as
search time.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass


@dataclass
class Curve:
    study: str
    space: str
    objective: str
    trials: int  # finished (complete or pruned) trials
    best: float
    # (trial count, trial seconds so far, wall seconds so far, best so far) per finished trial
    points: list[tuple[int, float, float, float]]

    def reach(self, target: float) -> tuple[int, float, float] | None:
        """(trials, trial seconds, wall seconds) when the best first reached ``target``."""
        for n, seconds, wall, best in self.points:
            if best >= target - 1e-12:
                return n, seconds, wall
        return None


def curve(study) -> Curve:
    from optuna.trial import TrialState

    from autosparse.tuning import SPEC_ATTR

    spec = study.user_attrs.get(SPEC_ATTR, {})
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if t.datetime_complete is not None and t.datetime_start is not None
    ]
    done.sort(key=lambda t: t.datetime_complete)
    if not done:
        raise SystemExit(f"study {study.study_name!r} has no finished trial")
    start = min(t.datetime_start for t in done)
    best = float("-inf")
    seconds = 0.0
    points = []
    for n, t in enumerate(done, start=1):
        seconds += float(
            t.user_attrs.get("seconds") or (t.datetime_complete - t.datetime_start).total_seconds()
        )
        feasible = t.user_attrs.get("feasible", True) and all(
            v <= 0 for v in (t.constraints or {}).values()
        )
        if t.state == TrialState.COMPLETE and feasible and t.value is not None:
            best = max(best, float(t.value))
        wall = (t.datetime_complete - start).total_seconds()
        points.append((n, seconds, wall, best))
    return Curve(
        study=study.study_name,
        space=spec.get("space", "formula"),
        objective=spec.get("objective") or "task",
        trials=len(done),
        best=best,
        points=points,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--plot", default=None, help="write best-so-far against wall time (PNG)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from autosparse.tuning import load_existing, open_storage

    storage = open_storage(args.storage, heartbeat=None)
    curves = []
    for name in args.studies:
        study = load_existing(storage, name)
        if study is None:
            raise SystemExit(f"no study {name!r} in {args.storage}")
        curves.append(curve(study))
    target = min(c.best for c in curves)
    rows = []
    for c in curves:
        own, common = c.reach(c.best), c.reach(target)
        rows.append(
            {
                "study": c.study,
                "space": c.space,
                "objective": c.objective,
                "trials": c.trials,
                "trial seconds": round(c.points[-1][1], 1),
                "wall seconds": round(c.points[-1][2], 1),
                "best": c.best,
                "to best: trials": own[0],
                "to best: trial seconds": round(own[1], 1),
                "common target": target,
                "to target: trials": common[0],
                "to target: trial seconds": round(common[1], 1),
            }
        )
    if args.json:
        print(json.dumps({"rows": rows, "curves": [asdict(c) for c in curves]}, indent=2))
    else:
        head = list(rows[0])
        print(" | ".join(head))
        for r in rows:
            print(" | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in head))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for c in curves:
            xs = [p[1] / 60 for p in c.points]
            ys = [p[3] for p in c.points]
            ax.step(xs, ys, where="post", marker="o", ms=3, label=f"{c.study} ({c.space})")
        ax.axhline(target, linestyle="--", color="gray", label="common target")
        ax.set_xlabel("search time, minutes (sum of trial times)")
        ax.set_ylabel("best so far (the study value; higher is better)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
