"""Time of CoreInfer's selection statistics (``vote_statistics``) on one layer's prompt
activations, and its parts, optionally side by side with an older revision.

    .venv/bin/python benchmarks/selection_speed.py                      # T = 64, 256, 1024
    .venv/bin/python benchmarks/selection_speed.py --baseline 21c0064   # old vs current
    .venv/bin/python benchmarks/selection_speed.py --threads 2 --clock wall

Activations: SiLU-gated-like random values of shape (1, T, N), N = 8192 (Llama-3.2-1B's
FFN), token ratio 0.2, so the per-token quota is about 0.2 * N / 2 = 819. Every
configuration runs once per round, in rotating order, after a warm-up; medians over
rounds. The clock is the process's CPU time with one thread by default (what the work
costs when other processes share the machine), or wall time. With ``--baseline`` the
votes of both revisions are compared and must be identical.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch


def load_baseline(rev: str):
    """``vote_statistics`` as autosparse/engine/selection.py defined it at ``rev``."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{rev}:autosparse/engine/selection.py"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType("selection_baseline")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:autosparse/engine/selection.py", "exec"), module.__dict__)
    return module.vote_statistics


def activations(tokens: int, neurons: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, neurons, generator=g)
    return x * torch.sigmoid(x) * torch.randn(1, tokens, neurons, generator=g)


def measure(tokens: int, args, clock, old) -> None:
    """Time the configurations for one prompt length and print their medians."""
    from autosparse.engine.selection import token_quota, vote_statistics

    acts = activations(tokens, args.neurons, tokens)
    valid = torch.ones(1, tokens, dtype=torch.bool)
    ratio = args.token_ratio
    k = int(token_quota(acts, valid, ratio).max())
    runs = {
        "vote_statistics": lambda: vote_statistics(acts, valid, ratio),
        "  topk, sorted": lambda: acts.topk(k, dim=-1),
        "  topk, unsorted": lambda: acts.topk(k, dim=-1, sorted=False),
        "  token_quota": lambda: token_quota(acts, valid, ratio),
    }
    baseline = f"vote_statistics at {args.baseline}"
    if old is not None:
        runs[baseline] = lambda: old(acts, valid, ratio)
        got, want = vote_statistics(acts, valid, ratio), old(acts, valid, ratio)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for name in names:
        runs[name]()  # warm-up
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = clock()
            runs[name]()
            times[name].append((clock() - t0) * 1e3)
    print(f"T = {tokens}, quota {k}:")
    for name in names:
        v = times[name]
        print(f"  {name:<34} {statistics.median(v):8.2f} ms (min {min(v):.2f})")
    if old is not None:
        pairs = zip(times["vote_statistics"], times[baseline], strict=True)
        ratio_median = statistics.median(a / b for a, b in pairs)
        print(f"  current / {args.baseline}, median of per-round ratios: {ratio_median:.2f}")
        print("  same votes and masses")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="64,256,1024", help="prompt lengths T")
    ap.add_argument("--neurons", type=int, default=8192)
    ap.add_argument("--token-ratio", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--baseline", metavar="REV", help="also time vote_statistics as of REV")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock, "
        f"N = {args.neurons}, token ratio {args.token_ratio}, {args.rounds} rounds"
    )
    old = load_baseline(args.baseline) if args.baseline else None
    for tokens in (int(t) for t in args.tokens.split(",")):
        measure(tokens, args, clock, old)


if __name__ == "__main__":
    main()
