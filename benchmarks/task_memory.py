"""Peak memory and wall time of one task evaluation on a real model, in a fresh process.

    python benchmarks/task_memory.py --model qwen2.5-0.5b --task asdiv-local --docs 16

Loads the model, builds the task's evaluator (few-shot prompts, no result store) and
evaluates one method on the first ``--docs`` documents at ``--batch-size``, then prints
the resident set size after loading, after the evaluation and its peak (the kernel's
VmHWM, Linux only), and the evaluation's wall time and score. One process per figure,
so a peak is that evaluation's own; compare two versions of the code by running the
same command with ``PYTHONPATH`` pointing at each checkout, alternating between them.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def memory_gb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in GB, from /proc."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return tuple(int(fields[k].split()[0]) / 1e6 for k in ("VmRSS", "VmHWM"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--task", default="asdiv-local")
    parser.add_argument("--method", choices=["dense", "coreinfer"], default="coreinfer")
    parser.add_argument("--keep", type=float, default=0.4)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--num-fewshot", type=int, default=6)
    parser.add_argument("--max-gen-toks", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    from autosparse import workflow
    from autosparse.methods import Method
    from autosparse.models import model_identity
    from autosparse.tasks.evaluator import EvaluatorOptions, TaskEvaluator

    loaded = workflow.load_quietly(args.model, "auto", "auto")
    loaded_rss, _ = memory_gb()
    options = EvaluatorOptions(
        model_id=model_identity(args.model),
        task=args.task,
        num_fewshot=args.num_fewshot,
        max_gen_toks=args.max_gen_toks,
        batch_size=args.batch_size,
        progress=False,
    )
    evaluator = TaskEvaluator(loaded, options)
    ids = evaluator.document_ids()[: args.docs]
    method = Method.dense() if args.method == "dense" else Method.coreinfer(args.keep)
    start = time.perf_counter()
    result = evaluator.run(method, ids)
    seconds = time.perf_counter() - start
    rss, peak = memory_gb()
    print(
        f"{args.model} {args.task} {args.method} {len(ids)} documents, batch {args.batch_size}: "
        f"score {result.score:.4f}, {seconds:.1f} s; RSS {loaded_rss:.2f} GB loaded, "
        f"{rss:.2f} GB after, peak {peak:.2f} GB; load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
