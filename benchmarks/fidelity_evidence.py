"""Evidence for the fidelity objective (issue 6): is a fidelity screen cheaper than a task
screen, and does it rank level settings the way the task metric on held-out documents does?

On the real SmolLM2-135M (float32, CPU) and a real local task, for a set of level
settings at one goal (levels solved from calibration statistics for a spread of
``w_sum``/``top_k``, random per-layer vectors with the goal's mean, and CoreInfer's
uniform keep at the goal), plus CoreInfer at other keep ratios:

- fidelity (and KL) on a seeded screen of documents,
- the task metric on the same screen, and on held-out documents disjoint from it and
  from the calibration documents,

then (a) seconds per trial of each objective on the screen, (b) Spearman rank
correlations with the held-out task metric, (c) the trial-to-trial standard deviation
of each screen score, next to its paired sampling noise versus CoreInfer.

Every evaluation is cached in a SQLite ResultStore (``--out``/evidence.db), so a rerun
resumes. Results: ``--out``/evidence.json, the plot ``docs/fidelity.png`` (with --plot).

    .venv/bin/python benchmarks/fidelity_evidence.py --task csqa-local --plot docs/fidelity.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    r = spearmanr(x, y).statistic
    return float(r)


def level_settings(index, goal: float, n_solve: int, n_random: int, n_layers: int, seed: int):
    """(label, kind, keep) at the goal: solved levels for a spread of (w_sum, top_k) (distinct
    vectors only), random per-layer vectors with mean = goal, and CoreInfer's uniform keep."""
    from autosparse.tuning import clamp_levels

    out, seen = [], set()
    grid = [(w, k) for k in (25, 100, 400) for w in (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)]
    for w_sum, top_k in grid:
        _, levels = index.solve(w_sum, round(1 - w_sum, 10), top_k, goal)
        levels = tuple(clamp_levels(levels))
        if levels in seen:
            continue
        seen.add(levels)
        out.append((f"levels w_sum={w_sum:g} top_k={top_k}", "levels", levels))
        if len(out) >= n_solve:
            break
    rng = random.Random(seed)
    for j in range(n_random):
        spread = [0.1, 0.2, 0.3][j % 3]
        raw = [goal + rng.uniform(-spread, spread) for _ in range(n_layers)]
        shift = goal - sum(raw) / n_layers
        levels = tuple(clamp_levels([min(1.0, max(0.05, x + shift)) for x in raw]))
        out.append((f"random ±{spread:g} #{j}", "random", levels))
    out.append((f"coreinfer keep={goal:g}", "coreinfer", goal))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="csqa-local")
    ap.add_argument("--goal", type=float, default=0.4)
    ap.add_argument("--screen", type=int, default=30)
    ap.add_argument("--heldout", type=int, default=60)
    ap.add_argument("--calibration", type=int, default=100)
    ap.add_argument("--n-solve", type=int, default=13)
    ap.add_argument("--n-random", type=int, default=6)
    ap.add_argument("--other-keeps", default="0.25,0.6")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--min-new-tokens", type=int, default=12)
    ap.add_argument("--max-gen-toks", type=int, default=None, help="task generation length")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default="/tmp/autosparse-fidelity")
    ap.add_argument("--plot", default=None)
    ap.add_argument(
        "--cached-only",
        action="store_true",
        help="summarize and plot from the cache: run no task evaluation that is not stored",
    )
    ap.add_argument(
        "--replot", action="store_true", help="only redraw --plot from --out's evidence.json"
    )
    ap.add_argument(
        "--time-only",
        type=int,
        default=0,
        metavar="N",
        help="only time trials on the screen, without any cache of results: N settings at "
        "the goal with fidelity (prompts kept, and run again per trial) and with the task",
    )
    args = ap.parse_args()
    if args.replot:
        summary = json.loads((Path(args.out) / args.task / "evidence.json").read_text())
        plot(summary["rows"], summary, args.plot)
        return 0

    import torch

    torch.set_num_threads(2)
    from autosparse.adapters import adapter_for
    from autosparse.calibration import CalibrationChoice, calibration_stats, choose_calibration
    from autosparse.engine.config import resolve_layers
    from autosparse.fidelity.evaluator import FidelityEvaluator
    from autosparse.levels import LevelsIndex
    from autosparse.methods import Method
    from autosparse.models import load_model, model_identity
    from autosparse.store import ResultStore
    from autosparse.tasks.evaluator import EvaluatorOptions, TaskEvaluator

    out = Path(args.out) / args.task
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    loaded = load_model("smollm2-135m", device="cpu", dtype="float32")
    model_id = model_identity("smollm2-135m")
    layers = resolve_layers(None, adapter_for(loaded.model).num_layers(loaded.model))

    prompts = choose_calibration(
        CalibrationChoice(task=args.task, n=args.calibration, seed=args.seed + 1)
    )
    stats, _ = calibration_stats(
        prompts,
        model_id=model_id,
        load_model=lambda: (loaded.model, loaded.tokenizer),
        dtype="float32",
        directory=out / "calibration",
        progress=False,
    )
    index = LevelsIndex.from_stats(stats, layers)

    store = ResultStore(f"sqlite:///{out / 'evidence.db'}")
    common = EvaluatorOptions(
        model_id=model_id,
        task=args.task,
        num_fewshot=0,
        batch_size=args.batch_size,
        seed=args.seed,
        max_gen_toks=args.max_gen_toks,
        progress=False,
    )
    task_ev = TaskEvaluator(loaded, replace(common, store=store))
    fid_ev = FidelityEvaluator(
        loaded,
        replace(common, store=store),
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
    )
    calib_ids = set(prompts.ids)
    pool = [i for i in task_ev.document_ids() if i not in calib_ids]
    drawn = random.Random(args.seed).sample(pool, args.screen + args.heldout)
    screen, heldout = sorted(drawn[: args.screen]), sorted(drawn[args.screen :])
    task_ev.prepare(screen)  # as a study does: the screen's requests are built once
    if args.time_only:
        return time_trials(args, loaded, index, stats, screen, common, fid_ev)

    settings = level_settings(
        index, args.goal, args.n_solve, args.n_random, len(stats.layers), args.seed
    )
    for k in (float(x) for x in args.other_keeps.split(",") if x):
        settings.append((f"coreinfer keep={k:g}", "coreinfer-other", k))
    settings.append(("dense", "dense", None))

    def method_of(kind, keep):
        if kind == "dense":
            return Method.dense()
        if kind.startswith("coreinfer"):
            return Method.coreinfer(keep)
        return Method.levels(keep)

    t0 = time.perf_counter()
    fid_ev.references(screen)
    reference_seconds = time.perf_counter() - t0
    print(f"references for {len(screen)} screen documents: {reference_seconds:.1f} s", flush=True)

    # Phase 1, fidelity for every setting (cheap). A summary is written after every
    # task evaluation, so an interrupted run still leaves usable (partial) results.
    rows = []
    for label, kind, keep in settings:
        method = method_of(kind, keep)
        f = fid_ev.run(method, screen)
        rows.append(
            {
                "label": label,
                "kind": kind,
                "mean_keep": method.mean_keep,
                "density": f.density,
                "fidelity": f.metrics["fidelity"],
                "kl": f.metrics["kl"],
                "fidelity_seconds": f.seconds,
                "_method": method,
                "_fid": (f.sample_ids, f.sample_scores),
            }
        )
        print(
            f"{label:32s} keep {method.mean_keep:.3f} realized {_f(f.density)}  "
            f"fidelity {f.metrics['fidelity']:.4f} kl {f.metrics['kl']:.4f} ({f.seconds:.1f}s)",
            flush=True,
        )
    # Phase 2, the task metric on held-out documents and on the screen, setting by
    # setting: CoreInfer (the paired baseline) and dense first, then the settings at the goal from
    # the extremes of the fidelity ranking inwards (best, worst, second best, ...), so
    # that a run cut short by the time budget still spans the fidelity range; the other
    # keep ratios last.
    base = [r for r in rows if r["kind"] == "coreinfer"]
    goal_rows = sorted(
        (r for r in rows if r["kind"] in ("levels", "random")), key=lambda r: -r["fidelity"]
    )
    inward = []
    while goal_rows:
        inward.append(goal_rows.pop(0))
        if goal_rows:
            inward.append(goal_rows.pop())
    dense = [r for r in rows if r["kind"] == "dense"]
    others = [r for r in rows if r["kind"] == "coreinfer-other"]
    for row in base + dense + inward + others:
        for phase, ids, key in (
            ("held-out", heldout, "task_heldout"),
            ("screen", screen, "task_screen"),
        ):
            if args.cached_only and (
                store.find(model_id, task_ev.task, row["_method"], task_ev._settings(ids)) is None
            ):
                continue
            r = task_ev.run(row["_method"], ids)
            row[key], row[key + "_seconds"] = r.score, r.seconds
            row["_" + key] = (r.sample_ids, r.sample_scores)
            print(f"{row['label']:32s} task {phase} {r.score:.3f} ({r.seconds:.1f}s)", flush=True)
        summarize(rows, args, model_id, screen, heldout, reference_seconds, t_start, out)
    summary = summarize(rows, args, model_id, screen, heldout, reference_seconds, t_start, out)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))
    if args.plot:
        plot(rows, summary, args.plot)
    store.close()
    return 0


def time_trials(args, loaded, index, stats, screen, common, stored_fid) -> int:
    """Seconds per trial on the screen for the first N settings at the goal, every
    evaluator fresh and without a result store (so nothing is served from a cache)."""
    from autosparse.fidelity.evaluator import FidelityEvaluator
    from autosparse.methods import Method
    from autosparse.tasks.evaluator import TaskEvaluator

    refs = stored_fid.references(screen)  # generated or read once, as in a study
    settings = level_settings(
        index, args.goal, args.n_solve, args.n_random, len(stats.layers), args.seed
    )
    methods = [
        Method.levels(keep) if kind != "coreinfer" else Method.coreinfer(keep)
        for _, kind, keep in settings
    ][: args.time_only]
    lengths = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens)
    kept = FidelityEvaluator(loaded, common, **lengths)
    kept._references = dict(refs)
    again = FidelityEvaluator(loaded, replace(common, prompt_cache_gb=0), **lengths)
    again._references = dict(refs)
    task_ev = TaskEvaluator(loaded, common)
    task_ev.prepare(screen)
    t0 = time.perf_counter()
    kept.run(Method.coreinfer(args.goal), screen)  # runs the prompts: once per study
    first = time.perf_counter() - t0
    rows = []
    for method in methods:
        a = kept.run(method, screen)
        b = again.run(method, screen)
        c = task_ev.run(method, screen)
        assert abs(a.score - b.score) < 1e-3, (a.score, b.score)
        rows.append((a.seconds, b.seconds, c.seconds))
        print(
            f"{method.label():24s} "
            f"fidelity {a.seconds:.2f}s (prompts again {b.seconds:.2f}s) task {c.seconds:.2f}s",
            flush=True,
        )
    med = [_median([r[k] for r in rows]) for k in range(3)]
    print(
        f"\n{args.task}, screen {len(screen)} documents, {len(rows)} settings at keep {args.goal:g}, "
        f"batch {args.batch_size}, references {_mean([len(r.continuation) for r in refs.values()]):.1f} "
        f"tokens, prompts {_mean([len(r.prompt_ids) for r in refs.values()]):.0f} tokens"
    )
    print(
        "| seconds per trial (median) | fidelity, prompts kept | fidelity, prompts run per trial | task |"
    )
    print("|---|---:|---:|---:|")
    print(f"| {len(screen)} documents | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.2f} |")
    print(f"task / fidelity: {med[2] / med[0]:.1f}x; running the prompts once: {first:.2f} s")
    return 0


def summarize(rows, args, model_id, screen, heldout, reference_seconds, t_start, out):
    from autosparse.stats import paired_difference

    def stats_of(subset):
        subset = [r for r in subset if "task_heldout" in r]
        fid = [r["fidelity"] for r in subset]
        negkl = [-r["kl"] for r in subset]
        th = [r["task_heldout"] for r in subset]
        with_ts = [r for r in subset if "task_screen" in r]
        ts = [r["task_screen"] for r in with_ts]
        th_ts = [r["task_heldout"] for r in with_ts]
        fid_ts = [r["fidelity"] for r in with_ts]
        if len(subset) < 3:
            return {"n_settings": len(subset)}
        return {
            "n_settings": len(subset),
            "n_settings_with_task_screen": len(with_ts),
            "spearman_fidelity_vs_heldout": spearman(fid, th),
            "spearman_negkl_vs_heldout": spearman(negkl, th),
            "spearman_taskscreen_vs_heldout": spearman(ts, th_ts) if len(ts) > 2 else None,
            "spearman_fidelity_vs_taskscreen": spearman(fid_ts, ts) if len(ts) > 2 else None,
            "std_fidelity": _std(fid),
            "std_kl": _std(negkl),
            "std_task_screen": _std(ts) if len(ts) > 1 else None,
            "std_task_heldout": _std(th),
        }

    at_goal = [r for r in rows if r["kind"] in ("levels", "random", "coreinfer")]
    sparse = [r for r in rows if r["kind"] != "dense"]
    base = next((r for r in rows if r["kind"] == "coreinfer"), None)

    def noise(key):
        """Mean half-width of the paired 95% interval versus CoreInfer, over the settings."""
        if base is None or key not in base:
            return math.nan
        widths = []
        for r in at_goal:
            if r is base or key not in r:
                continue
            d = paired_difference(*r[key], *base[key], seed=args.seed)
            widths.append((d.high - d.low) / 2)
        return sum(widths) / len(widths) if widths else math.nan

    for r in rows:
        for key, name in (
            ("_fid", "fidelity"),
            ("_task_screen", "task_screen"),
            ("_task_heldout", "task_heldout"),
        ):
            if base is not None and key in r and key in base and r is not base:
                d = paired_difference(*r[key], *base[key], seed=args.seed)
                r[f"vs_coreinfer_{name}"] = [d.mean, d.low, d.high]

    def split_half(key, n_splits=200):
        """Reliability of a screen's ranking of the settings at the goal: the mean Spearman
        correlation between the rankings on two random halves of its documents."""
        sel = [r for r in at_goal if key in r]
        if len(sel) < 3:
            return None
        ids = list(sel[0][key][0])
        rhos = []
        for j in range(n_splits):
            half = set(random.Random(j).sample(ids, len(ids) // 2))
            a, b = [], []
            for r in sel:
                pairs = list(zip(*r[key], strict=True))
                a.append(_mean([x for i, x in pairs if i in half]))
                b.append(_mean([x for i, x in pairs if i not in half]))
            rho = spearman(a, b)
            if math.isfinite(rho):
                rhos.append(rho)
        return {"settings": len(sel), "mean_rho": _mean(rhos) if rhos else None}

    summary = {
        "task": args.task,
        "model": model_id,
        "goal": args.goal,
        "screen": len(screen),
        "heldout": len(heldout),
        "max_new_tokens": args.max_new_tokens,
        "reference_seconds": reference_seconds,
        "seconds_per_trial_fidelity": _median([r["fidelity_seconds"] for r in sparse]),
        "seconds_per_trial_task": _median(
            [r["task_screen_seconds"] for r in sparse if "task_screen_seconds" in r]
        ),
        "seconds_per_trial_task_heldout": _median(
            [r["task_heldout_seconds"] for r in sparse if "task_heldout_seconds" in r]
        ),
        "fidelity_at_goal_all": {
            "n_settings": len(at_goal),
            "std_fidelity": _std([r["fidelity"] for r in at_goal]),
            "std_kl": _std([r["kl"] for r in at_goal]),
            "range_fidelity": [
                min(r["fidelity"] for r in at_goal),
                max(r["fidelity"] for r in at_goal),
            ],
            "median_seconds": _median([r["fidelity_seconds"] for r in at_goal]),
        },
        "at_goal": stats_of(at_goal),
        "all_sparse": stats_of(sparse),
        "split_half_fidelity": split_half("_fid"),
        "split_half_task_screen": split_half("_task_screen"),
        "split_half_task_heldout": split_half("_task_heldout"),
        "paired_ci_halfwidth_fidelity": noise("_fid"),
        "paired_ci_halfwidth_task_screen": noise("_task_screen"),
        "paired_ci_halfwidth_task_heldout": noise("_task_heldout"),
        "total_seconds": time.perf_counter() - t_start,
        "settings_done": len(rows),
        "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
    }
    (out / "evidence.json").write_text(json.dumps(summary, indent=2))
    return summary


def plot(rows, summary, path) -> None:
    """Left: fidelity on the screen against the task metric on held-out documents.
    Middle and right: each setting at the goal minus CoreInfer, with the paired 95%
    interval, for fidelity on the screen and for the task metric on held-out documents
    (same order: by fidelity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "levels": "tab:blue",
        "random": "tab:orange",
        "coreinfer": "tab:red",
        "coreinfer-other": "tab:purple",
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    ax = axes[0]
    for kind, color in colors.items():
        sel = [r for r in rows if r["kind"] == kind and "task_heldout" in r]
        ax.scatter([r["fidelity"] for r in sel], [r["task_heldout"] for r in sel], c=color, s=22)
        for r in sel:
            if kind == "coreinfer-other" or kind == "coreinfer":
                ax.annotate(f"{r['mean_keep']:g}", (r["fidelity"], r["task_heldout"]), fontsize=7)
    g = summary["at_goal"]
    rho = g.get("spearman_fidelity_vs_heldout")
    ax.set_title(
        f"{g['n_settings']} settings at keep {summary['goal']:g}: Spearman "
        + ("-" if rho is None else f"{rho:+.2f}"),
        fontsize=10,
    )
    ax.set_xlabel("fidelity on the screen (nats/token)")
    ax.set_ylabel(f"{summary['task']} on {summary['heldout']} held-out documents")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in colors.items()]
    ax.legend(handles=handles, fontsize=7)

    at_goal = sorted(
        (r for r in rows if r["kind"] in ("levels", "random")), key=lambda r: r["fidelity"]
    )
    for ax, name, label in (
        (axes[1], "fidelity", f"fidelity, {summary['screen']} screen docs"),
        (axes[2], "task_heldout", f"{summary['task']}, {summary['heldout']} held-out docs"),
    ):
        ys, xs, lo, hi, cs = [], [], [], [], []
        for y, r in enumerate(at_goal):
            v = r.get(f"vs_coreinfer_{name}")
            if v is None:
                continue
            ys.append(y)
            xs.append(v[0])
            lo.append(v[0] - v[1])
            hi.append(v[2] - v[0])
            cs.append(colors[r["kind"]])
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="none", ecolor="gray", lw=1)
        ax.scatter(xs, ys, c=cs, s=18, zorder=3)
        ax.axvline(0, color="tab:red", lw=0.8)
        ax.set_yticks([])
        ax.set_ylim(-1, len(at_goal))
        ax.set_xlabel(f"{label}: minus CoreInfer, paired 95% CI", fontsize=9)
        ax.set_title("settings at the goal, ordered by fidelity", fontsize=10)
    # (no timings here: the run's wall times depend on what else ran; --time-only
    # measures trial cost on its own)
    fig.suptitle(
        f"SmolLM2-135M, {summary['task']}, keep {summary['goal']:g}: {len(at_goal)} settings against CoreInfer, "
        f"{summary['screen']}-document screen, {summary['heldout']} held-out documents",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _std(xs) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _median(xs) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


if __name__ == "__main__":
    sys.exit(main())
