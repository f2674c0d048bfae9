"""The level vectors several studies found, by layer, in one plot: each study's best
trial (as finalize ranks them) beside the uniform keep of the first study's baseline.

    python benchmarks/level_vectors.py --storage sqlite:///studies/evidence.db \
        STUDY [STUDY...] --out levels.png [--label STUDY=NAME ...]

Prints each vector with its mean, its spread and how far it lies from uniform.
"""

from __future__ import annotations

import argparse
import statistics
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--label", action="append", default=[], help="STUDY=NAME in the legend")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)

    from autosparse.levels_workflow import plot_level_vectors
    from autosparse.tuning import SPEC_ATTR, StudySpec, finished_trials, load_existing, open_storage

    labels = dict(item.split("=", 1) for item in args.label)
    storage = open_storage(args.storage, heartbeat=None)
    series: dict[str, list[float]] = {}
    baseline = None
    for name in args.studies:
        study = load_existing(storage, name)
        if study is None:
            raise SystemExit(f"no study {name!r} in {args.storage}")
        spec = StudySpec.from_dict(study.user_attrs[SPEC_ATTR])
        baseline = baseline or spec
        best = finished_trials(study)
        if not best:
            raise SystemExit(f"study {name!r} has no finished feasible trial")
        levels = [float(x) for x in best[0].user_attrs["levels"]]
        label = f"{labels.get(name, name)}: trial #{best[0].number}"
        series[label] = levels
        off = [abs(x - spec.baseline_keep) for x in levels]
        print(
            f"{label}: mean {statistics.fmean(levels):.3f}, min {min(levels):.2f}, "
            f"max {max(levels):.2f}, sd {statistics.pstdev(levels):.3f}, "
            f"{sum(d <= 0.05 + 1e-9 for d in off)}/{len(levels)} layers within 0.05 of "
            f"{spec.baseline_keep:g}"
        )
        print("  " + " ".join(f"{x:.2f}" for x in levels))
    plot_level_vectors(
        args.out,
        series,
        uniform=baseline.baseline_keep,
        uniform_label="uniform keep",
        title=args.title,
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
