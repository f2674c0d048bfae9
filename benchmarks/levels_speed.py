"""How fast a levels setting turns into per-layer levels, from cached statistics.

Synthetic statistics of the reference's shape (default 100 prompts x 28 layers x 8192
neurons, 64 tokens per prompt): per neuron a firing probability and a heavy-tailed
magnitude, so counts spread over 0..T and sums over orders of magnitude, as in real
gated models. Measures, in one process on the CPU:

- building the LevelsIndex (once per statistics and layer range);
- one setting -> levels with the index, over settings from the seed's grid;
- the plain vectorized formula (``levels_direct``) for comparison;
- goal solving (one threshold search) with the index.
- the share of groups that straddle their threshold, and with ``--phases`` the time of
  each step of a lookup (where a setting's time goes).

Run: .venv/bin/python benchmarks/levels_speed.py [--prompts 100 --layers 28 --neurons 8192 --tokens 64]
Numbers go to docs/performance.md ("Levels"). The main figure is CPU time (best of a few
runs per setting): the computation is single-threaded numpy, and CPU time is what it
costs even when other processes share the machine; wall time and the load average are
printed beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def synthetic_stats(prompts: int, layers: int, neurons: int, tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (prompts, layers, neurons)
    fire = rng.beta(2, 2, size=shape)
    c = rng.binomial(tokens, fire).astype(np.int16)
    magnitude = rng.lognormal(0.0, 1.0, size=shape)
    S = (c * magnitude * rng.gamma(4.0, 0.25, size=shape)).astype(np.float32)
    return S, c


def timed(fn, repeat: int) -> tuple[float, float]:
    """(best CPU ms, median wall ms) of ``fn()`` over ``repeat`` calls after one warm-up.

    The work is single-threaded numpy, so the process's CPU time is the cost of the
    computation; wall time also counts the waits when other processes share the cores.
    """
    fn()
    cpu, wall = [], []
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append((time.process_time() - c0) * 1e3)
        wall.append((time.perf_counter() - w0) * 1e3)
    return min(cpu), statistics.median(wall)


def thresholds(index, setting) -> np.ndarray:
    """t per group for a setting with w_sum > 0 and no unit with S_(k) = 0, computed as
    ``LevelsIndex.counts`` does."""
    w_sum, w_count, threshold, top_k = setting
    s_k, _ = index._s_k(top_k)
    t = index._g_norm * -float(w_count)
    t += threshold
    t *= s_k
    t /= w_sum
    return t


def straddling(index, setting) -> float:
    """Share of the groups whose smallest S is <= t < their largest S."""
    t = thresholds(index, setting)
    return float(np.mean((t >= index._g_min) & (t < index._g_max)))


def lookup_phases(index, setting, repeat: int) -> list[tuple[str, float]]:
    """CPU ms of each step of ``LevelsIndex._position`` applied to every group, as the
    index does when most groups straddle: where a setting's time goes. The steps mirror
    autosparse/levels.py; the last line checks that they give its counts."""
    from autosparse.levels import _cell_of

    out = []
    t = thresholds(index, setting)
    out.append(
        ("thresholds t (4 array operations)", timed(lambda: thresholds(index, setting), repeat)[0])
    )

    def settle():
        every = t < index._g_min
        return np.count_nonzero((t < index._g_max) ^ every)

    out.append(("settle by smallest and largest S", timed(settle, repeat)[0]))

    def bits():
        f = t.astype(np.float32)
        q = f.view(np.int32).astype(np.int64)
        q -= f > t
        return q

    q = bits()
    out.append(("float32 bits of t", timed(bits, repeat)[0]))

    def cell_of():
        return index._g_start + _cell_of(q, index._g_lo, index._g_scale, index._g_last)

    cell = cell_of()
    out.append(("cell number", timed(cell_of, repeat)[0]))
    out.append(
        (
            f"cell table read ({index._cells.nbytes / 2**20:.0f} MiB table)",
            timed(lambda: np.take(index._cells, cell), repeat)[0],
        )
    )
    word = np.take(index._cells, cell)

    def decode():
        pos = word >> 32
        low = word & 0xFFFFFFFF
        below = (low & 0x7FFFFFFF) <= q
        pos += below
        return pos, np.flatnonzero(below & (low > 0x7FFFFFFF))

    pos, more = decode()
    out.append(("decode the cell word", timed(decode, repeat)[0]))
    end = index._g_end[more]
    out.append(
        (
            f"search cells of 2+ neurons ({more.size / t.size:.0%} of groups)",
            timed(lambda: index._search(pos[more], end, q[more]), repeat)[0],
        )
    )
    pos[more] = index._search(pos[more], end, q[more])
    out.append(
        (
            "sum per prompt and layer",
            timed(lambda: np.add.reduceat(index._g_end - pos, index._unit_first), repeat)[0],
        )
    )
    counts = np.add.reduceat(index._g_end - pos, index._unit_first)
    assert np.array_equal(counts, index.counts(*setting).ravel())
    out.append(
        ("the whole setting (LevelsIndex.counts)", timed(lambda: index.counts(*setting), repeat)[0])
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--neurons", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5, help="repeats per setting")
    ap.add_argument("--direct", type=int, default=3, help="settings timed with levels_direct")
    ap.add_argument(
        "--phases",
        action="store_true",
        help="time the steps of one setting's lookup over all groups (where the time goes)",
    )
    args = ap.parse_args()

    from autosparse.levels import LevelsIndex, levels_direct

    S, c = synthetic_stats(args.prompts, args.layers, args.neurons, args.tokens)
    print(
        f"statistics: {args.prompts} prompts x {args.layers} layers x {args.neurons} neurons, "
        f"{args.tokens} tokens per prompt; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    t0 = time.perf_counter()
    index = LevelsIndex(S, c)
    print(
        f"build index:             {time.perf_counter() - t0:8.2f} s "
        f"({index.num_groups} groups, {index.nbytes / 2**20:.0f} MiB)"
    )
    t0 = time.perf_counter()
    index.hundredths(0.45, 0.55, 0.3, 100)
    print(
        f"first use of a top_k:    {(time.perf_counter() - t0) * 1e3:8.1f} ms (S_(k) per prompt/layer)"
    )

    grid = [
        (w, round(1 - w, 10), th, 100)
        for w in (0.1, 0.3, 0.45, 0.6, 0.8, 0.95)
        for th in (0.15, 0.25, 0.35, 0.5)
    ]
    cpu, wall = [], []
    for setting in grid:
        best, med = timed(lambda s=setting: index.hundredths(*s), args.repeat)
        cpu.append(best)
        wall.append(med)
    print(
        f"index, one setting:      CPU median {statistics.median(cpu):6.2f} ms, "
        f"worst {max(cpu):6.2f} ms over {len(grid)} settings of the seed's grid "
        f"(best of {args.repeat} runs each); wall median {statistics.median(wall):.2f} ms"
    )
    share = [straddling(index, setting) for setting in grid]
    print(
        f"groups straddling their threshold (each needs a lookup): median "
        f"{statistics.median(share):.0%}, fewest {min(share):.0%}, most {max(share):.0%} "
        f"of the grid's settings"
    )
    if args.phases:
        worst = grid[int(np.argmax(cpu))]
        print(f"steps of a lookup of all {index.num_groups} groups, setting {worst} (CPU ms):")
        for name, ms in lookup_phases(index, worst, args.repeat):
            print(f"  {name:<46} {ms:7.2f}")

    for setting in grid[: args.direct]:
        ours = index.hundredths(*setting) / 100
        ref = levels_direct(
            S, c, w_sum=setting[0], w_count=setting[1], threshold=setting[2], top_k=setting[3]
        )
        assert np.array_equal(ours, ref), (setting, ours, ref)
    best, med = timed(
        lambda: levels_direct(S, c, w_sum=0.45, w_count=0.55, threshold=0.3, top_k=100),
        max(1, args.direct),
    )
    print(f"direct formula:          CPU {best:8.1f} ms, wall median {med:6.1f} ms (same levels)")

    best, med = timed(lambda: index.solve_goal(0.4, 0.45, 0.55, 100), 3)
    calls = []
    plain = index.hundredths
    index.hundredths = lambda *a: calls.append(a) or plain(*a)  # count evaluations
    result = index.solve_goal(0.4, 0.45, 0.55, 100)
    index.hundredths = plain
    print(
        f"goal solving (goal 0.4): CPU {best:8.1f} ms, wall median {med:6.1f} ms, "
        f"{len(calls)} thresholds evaluated -> "
        f"threshold {result.threshold}, mean {result.mean:.4f}"
    )


if __name__ == "__main__":
    main()
