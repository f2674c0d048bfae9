"""How much of a truthfulqa-local comparison is abstention: every question lists
"I have no comment." among its correct answers, so that answer scores well on bleu_max
whatever the question. Reads the stored evaluations of a store (e.g. the one
benchmarks/evidence.sh fills), counts each method's abstentions on the documents it was
evaluated on, and gives every pair's paired difference on all of them and on those where
neither method abstained.

    python benchmarks/abstentions.py --storage sqlite:///studies/evidence.db [--n 300]
"""

from __future__ import annotations

import argparse
import itertools

# what the model writes when it abstains, after the primer's "A: " convention
ABSTAIN = "A: I have no comment."


def method_label(method: dict) -> str:
    name, selector = method["name"], method.get("selector", "coreinfer")
    if name == "dense":
        return "dense"
    rule = "GRIFFIN" if selector == "griffin" else "CoreInfer"
    if name == "coreinfer":
        return f"{rule} keep={method['keep']:g}"
    keep = method["keep"]
    return f"levels mean={sum(keep) / len(keep):.3f} ({rule}), [{min(keep):.2f}-{max(keep):.2f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", required=True)
    parser.add_argument("--task", default="truthfulqa-local")
    parser.add_argument("--n", type=int, default=300, help="evaluations on this many documents")
    args = parser.parse_args(argv)

    from autosparse.stats import paired_difference
    from autosparse.store import ResultStore
    from autosparse.tasks.data import truthfulqa_rows
    from autosparse.tasks.metrics import truthfulqa_results

    with ResultStore(args.storage) as store:
        found = [
            r
            for r in store.list(task=args.task)
            if r.metric == "bleu_max" and len(r.sample_ids) == args.n
        ]
    if not found:
        raise SystemExit(f"no bleu_max evaluation of {args.task} on {args.n} documents")
    rows = truthfulqa_rows()
    abstain_score: dict[int, float] = {}
    results = {}
    for r in found:
        scores = {}
        for i, s in zip(r.sample_ids, r.sample_scores, strict=True):
            i = int(i)
            if i not in abstain_score:
                abstain_score[i] = truthfulqa_results(rows[i], [ABSTAIN])["bleu_max"]
            scores[i] = float(s)
        results[method_label(r.method)] = scores

    def abstained(scores: dict[int, float], i: int) -> bool:
        return abs(scores[i] - abstain_score[i]) < 1e-6

    for label, scores in results.items():
        n = sum(abstained(scores, i) for i in scores)
        mean = sum(scores.values()) / len(scores)
        print(f"{label}: bleu_max {mean:.2f}, abstains on {n} of {len(scores)}")
    # every pair once, the higher-scoring method first
    ranked = sorted(results.items(), key=lambda kv: -sum(kv[1].values()) / len(kv[1]))
    for (la, a), (lb, b) in itertools.combinations(ranked, 2):
        for cut in (False, True):
            ids = sorted(set(a) & set(b))
            if cut:
                ids = [i for i in ids if not abstained(a, i) and not abstained(b, i)]
            d = paired_difference(ids, [a[i] for i in ids], ids, [b[i] for i in ids])
            scope = "neither abstains" if cut else "all documents"
            print(
                f"{la} - {lb}, {scope} ({d.n}): {d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}], "
                f"detectable {d.detectable():.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
