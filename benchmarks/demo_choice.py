"""Choosing the embedded default (`make demo`): on a candidate model/task, is dense clearly
above the floor, is dense vs CoreInfer resolved on a held-out-sized sample, and what does a
document cost per method?

For each candidate (task, shots, generated-token cap) it runs `autosparse eval` for dense
and for CoreInfer at one keep ratio on the same seeded sample, then pairs the per-sample
scores (autosparse.stats.paired_difference) and prints, per candidate: both scores, the
paired 95% interval of dense - CoreInfer, whether it excludes 0, and the wall seconds per
document of each method. Evaluations are stored in ``--out``/demo.db and reused, so a rerun
resumes where it stopped (the stored seconds are those of the original run).

    .venv/bin/python benchmarks/demo_choice.py --limit 60 \
        --candidate truthfulqa-local:6:32 --candidate nq-local:6:16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def run_eval(args, task: str, shots: int, max_gen: int | None, method: str) -> dict:
    cmd = [
        sys.executable,
        "-c",
        "from autosparse.cli import main; main()",
        "eval",
        "--model",
        args.model,
        "--task",
        task,
        "--method",
        method,
        "--limit",
        str(args.limit),
        "--num-fewshot",
        str(shots),
        "--batch-size",
        str(args.batch_size),
        "--json",
        "--storage",
        f"sqlite:///{Path(args.out).resolve()}/demo.db",
    ]
    if max_gen is not None:
        cmd += ["--max-gen-toks", str(max_gen)]
    if method == "coreinfer":
        cmd += ["--keep", str(args.keep), "--mode", args.mode]
    print("$ autosparse", " ".join(cmd[3:]), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def parse_candidate(text: str) -> tuple[str, int, int | None]:
    task, shots, *rest = text.split(":")
    return task, int(shots), (int(rest[0]) if rest and rest[0] else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--keep", type=float, default=0.4)
    parser.add_argument("--limit", type=int, default=60)
    # masked and sliced give the same outputs; masked is the faster one for batched
    # continuation scoring (multiple choice) on a CPU, sliced for batch-1 generation
    parser.add_argument("--mode", choices=("masked", "sliced"), default="masked")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--candidate",
        action="append",
        default=None,
        help="TASK:SHOTS[:MAX_GEN_TOKS] (repeatable)",
    )
    parser.add_argument("--out", default="benchmarks/out/demo_choice")
    args = parser.parse_args()
    candidates = [parse_candidate(c) for c in (args.candidate or ["truthfulqa-local:6:32"])]
    os.makedirs(args.out, exist_ok=True)

    from autosparse.stats import paired_difference

    rows = []
    for task, shots, max_gen in candidates:
        dense = run_eval(args, task, shots, max_gen, "dense")
        sparse = run_eval(args, task, shots, max_gen, "coreinfer")
        diff = paired_difference(
            dense["sample_ids"],
            dense["sample_scores"],
            sparse["sample_ids"],
            sparse["sample_scores"],
        )
        n = len(dense["sample_ids"])
        rows.append(
            {
                "task": task,
                "shots": shots,
                "max_gen_toks": max_gen,
                "metric": dense["metric"],
                "n": n,
                "dense": dense["score"],
                "coreinfer": sparse["score"],
                "diff": diff.mean,
                "low": diff.low,
                "high": diff.high,
                "resolved": diff.low > 0 or diff.high < 0,
                "dense_s_per_doc": dense["seconds"] / n,
                "coreinfer_s_per_doc": sparse["seconds"] / n,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out, "demo_choice.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(
        f"{'task':18} {'shots':>5} {'gen':>4} {'metric':10} {'n':>4} {'dense':>8} "
        f"{'coreinfer':>9} {'dense-CI [95%]':>24} {'s/doc d':>8} {'s/doc ci':>8}"
    )
    for r in rows:
        interval = f"{r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]"
        print(
            f"{r['task']:18} {r['shots']:>5} {r['max_gen_toks'] or '-':>4} {r['metric']:10} "
            f"{r['n']:>4} {r['dense']:>8.3f} {r['coreinfer']:>9.3f} {interval:>24} "
            f"{r['dense_s_per_doc']:>8.2f} {r['coreinfer_s_per_doc']:>8.2f}"
        )


if __name__ == "__main__":
    main()
