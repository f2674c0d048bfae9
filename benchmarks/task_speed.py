"""Task evaluation speed on a real model: multiple-choice trials with and without shared
contexts, and generation documents per minute at several batch sizes.

    python benchmarks/task_speed.py --model smollm2-135m                 # both parts
    python benchmarks/task_speed.py --model smollm2-135m --part choice --rounds 7
    python benchmarks/task_speed.py --model smollm2-135m --part generation --docs 24

Multiple choice ("choice"): one tuning trial's evaluation, i.e. ``PreparedTask.run`` of
a levels method on a screen of csqa-local documents (the requests built once, as a
study does), timed with every log-likelihood request answered by one forward pass per
row ("per-request", lm-eval's way, ``SparseLM(shared_contexts=False)``) and with each
question's prompt run once for all its choices ("shared"). Both run in every round,
their order alternating between rounds, after one warm-up round of each; reported:
wall-clock median and range over rounds, and the median of the per-round ratios. The
two paths must give the same per-document scores (checked every round) and log-
likelihoods within float tolerance (the largest difference is printed).

Generation ("generation"): documents per minute of ``PreparedTask.run`` on
truthfulqa-local under CoreInfer at each batch size, same documents, rounds as above.
Every batch size must give the same answers as batch 1 (checked). One warm-up run, at
the largest batch.

Wall clock with torch's default threads: on a shared machine the other processes'
load enters every figure (not necessarily alike: a path of many small operations loses
more to a descheduled thread); the load average is printed with each round.
``--clock cpu --threads 1`` times the multiple-choice part in CPU time of one thread
instead, which the other processes barely change.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's bars; read when tqdm is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


#: wall: elapsed time; cpu: this process's CPU time (with --threads 1, the time the work
#: needs whatever else the machine runs)
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def trial_levels(num_sparse: int, mean: float = 0.4, spread: float = 0.15) -> list[float]:
    """A levels vector like a tuned trial's: per-layer keep ratios rising through the
    sparse layers around ``mean``."""
    if num_sparse == 1:
        return [mean]
    return [round(mean - spread + 2 * spread * i / (num_sparse - 1), 2) for i in range(num_sparse)]


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times):.2f} s (range {min(times):.2f}-{max(times):.2f})"


def choice_part(args, loaded) -> None:
    from autosparse.adapters import adapter_for
    from autosparse.engine.config import resolve_layers
    from autosparse.methods import Method
    from autosparse.tasks.prepared import PreparedTask
    from autosparse.tasks.registry import load_task
    from autosparse.tasks.sampling import draw_sample

    _, task_obj = load_task(args.choice_task)
    ids = draw_sample(len(task_obj.eval_docs), args.screen, args.seed)
    prepared = PreparedTask(
        loaded.model,
        args.choice_task,
        ids,
        tokenizer=loaded.tokenizer,
        seed=args.seed,
        num_fewshot=args.shots,
        batch_size=args.batch_size,
    )
    layers = resolve_layers(None, adapter_for(loaded.model).num_layers(loaded.model))
    method = Method.levels(trial_levels(len(layers)), mode=args.mode)
    requests = sum(len(prepared._instances[i]) for i in ids)
    print(
        f"\n## {args.choice_task}: {len(ids)} documents ({requests} requests), "
        f"{args.shots} shots, batch {args.batch_size}, {method.label()}, {args.mode}"
    )

    def one(shared: bool):
        prepared.lm.shared_contexts = shared
        start = CLOCK[args.clock]()
        run = prepared.run(method)
        seconds = CLOCK[args.clock]() - start
        lls = [inst.resps[0][0] for i in ids for inst in prepared._instances[i]]
        return seconds, run, lls

    for shared in (False, True):  # warm-up: first calls, allocations
        one(shared)
    times: dict[bool, list[float]] = {False: [], True: []}
    ratios = []
    for n in range(args.rounds):
        order = (False, True) if n % 2 == 0 else (True, False)
        out = {shared: one(shared) for shared in order}
        (t_old, run_old, ll_old), (t_new, run_new, ll_new) = out[False], out[True]
        if run_old.result.sample_scores != run_new.result.sample_scores:
            raise SystemExit("the shared-context path changed a document's score")
        diff = max(abs(a - b) for a, b in zip(ll_old, ll_new, strict=True)) if ll_old else 0.0
        times[False].append(t_old)
        times[True].append(t_new)
        ratios.append(t_old / t_new)
        print(
            f"round {n + 1}: per-request {t_old:.2f} s, shared {t_new:.2f} s, "
            f"ratio {t_old / t_new:.2f}, max |d loglik| {diff:.1e}, "
            f"score {run_new.result.score:.4f}, load {load_average()}"
        )
    print(f"per-request: {summary(times[False])}")
    print(f"shared:      {summary(times[True])}")
    print(
        f"ratio (per round): median {statistics.median(ratios):.2f} "
        f"(range {min(ratios):.2f}-{max(ratios):.2f})"
    )


def generation_part(args, loaded) -> None:
    from autosparse.methods import Method
    from autosparse.tasks.prepared import PreparedTask
    from autosparse.tasks.registry import load_task
    from autosparse.tasks.sampling import draw_sample

    _, task_obj = load_task(args.generation_task)
    ids = draw_sample(len(task_obj.eval_docs), args.docs, args.seed)
    method = Method.coreinfer(args.keep, mode=args.mode)
    print(
        f"\n## {args.generation_task}: {len(ids)} documents, {method.label()}, {args.mode}, "
        f"max_gen_toks {args.max_gen_toks}"
    )
    prepared = {
        b: PreparedTask(
            loaded.model,
            args.generation_task,
            ids,
            tokenizer=loaded.tokenizer,
            seed=args.seed,
            batch_size=b,
            max_gen_toks=args.max_gen_toks,
        )
        for b in args.batch_sizes
    }

    def one(b: int):
        start = time.perf_counter()
        prepared[b].run(method)
        seconds = time.perf_counter() - start
        answers = [inst.resps for i in ids for inst in prepared[b]._instances[i]]
        return seconds, answers

    one(args.batch_sizes[-1])  # warm-up (the largest batch: the shortest run)
    times: dict[int, list[float]] = {b: [] for b in args.batch_sizes}
    for n in range(args.rounds):
        order = args.batch_sizes if n % 2 == 0 else list(reversed(args.batch_sizes))
        answers = {}
        for b in order:
            seconds, answers[b] = one(b)
            times[b].append(seconds)
        if any(answers[b] != answers[args.batch_sizes[0]] for b in args.batch_sizes):
            raise SystemExit("batched generation changed an answer")
        print(
            f"round {n + 1}: "
            + ", ".join(f"batch {b} {times[b][-1]:.1f} s" for b in args.batch_sizes)
            + f", load {load_average()}"
        )
    for b in args.batch_sizes:
        per_min = [60 * len(ids) / t for t in times[b]]
        print(
            f"batch {b}: {summary(times[b])}; documents/minute median "
            f"{statistics.median(per_min):.1f} (range {min(per_min):.1f}-{max(per_min):.1f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, hub id or folder")
    parser.add_argument("--part", choices=["choice", "generation", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--mode", choices=["masked", "sliced"], default="masked")
    parser.add_argument("--choice-task", default="csqa-local")
    parser.add_argument("--screen", type=int, default=30, help="documents of a trial")
    parser.add_argument("--shots", type=int, default=0, help="few-shot examples (demo: 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="multiple choice (tune: 8)")
    parser.add_argument("--generation-task", default="truthfulqa-local")
    parser.add_argument("--docs", type=int, default=16, help="generation documents")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--keep", type=float, default=0.4, help="CoreInfer keep (generation)")
    parser.add_argument("--max-gen-toks", type=int, default=64)
    parser.add_argument("--clock", choices=sorted(CLOCK), default="wall", help="multiple choice")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from autosparse.models import load_model

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), load {load_average()}"
    )
    start = time.perf_counter()
    loaded = load_model(args.model, device="cpu")
    print(f"model {args.model}: loaded in {time.perf_counter() - start:.1f} s, {loaded.dtype}")
    with torch.no_grad():
        if args.part in ("choice", "both"):
            choice_part(args, loaded)
        if args.part in ("generation", "both"):
            generation_part(args, loaded)


if __name__ == "__main__":
    main()
