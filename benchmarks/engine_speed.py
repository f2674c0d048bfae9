"""Decode speed of the sparse engine: dense vs sliced (and masked) on a Llama-shaped model.

    .venv/bin/python benchmarks/engine_speed.py            # the numbers in docs/performance.md
    .venv/bin/python benchmarks/engine_speed.py --quick    # a smoke run (~2 min)
    .venv/bin/python benchmarks/engine_speed.py --threads 2 --clock wall   # on a quiet machine

The model has random weights and the shape of Llama-3.2-1B (hidden 2048, 8192 FFN
neurons, 32 query / 8 key-value heads) with 8 layers (4 with --quick) and a 4096-token
vocabulary, so the FFN dominates the weight bytes a decode token reads. float32 on
CPU, batch 1. Every layer is sparse unless --layers says otherwise. The wide layers
(gate/up, lm_head) are stored column-major, as ``load_model`` stores a float32 model on
the CPU (``autosparse.layout``); --layout row keeps them row-major.

Decode is timed with a manual greedy loop over the KV cache (one prefill call, then
one forward call per new token), so prefill, weight gathering and patching never
enter the decode time; a run's rate is 1 / its median step time. Every configuration
runs once per round after a warm-up round, and the order rotates between rounds so
drift or a concurrent job hits them all alike. Reported: medians over rounds;
speedups and overheads are medians of per-round ratios against the dense run of the
same round.

Clock: by default the process's CPU time with one torch thread. On a shared machine
this ignores the time other processes hold the core (wall-clock timings there were
off by 3-8x), and one thread already draws the full memory bandwidth that decode
needs. --clock wall measures elapsed time; --attempts/--quiet then retry runs during
which other processes were busy (the "other processes" figures come from /proc/stat).

Ideal speedup = (weight bytes one decode token reads, dense) / (same, sparse): every
weight matrix and norm of the model plus lm_head, and one row of the embedding; on
sparse layers only the kept fraction of the FFN (the realized kept count the engine
recorded). KV-cache reads are not weights and are left out (they are < 1% here).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from autosparse.adapters import adapter_for  # noqa: E402
from autosparse.engine import SparseEngine  # noqa: E402
from autosparse.engine.config import resolve_layers  # noqa: E402
from autosparse.layout import LAYOUTS, column_major_wide  # noqa: E402

TARGET_IDEAL_FRACTION = 0.85  # sliced decode at keep 0.4 vs the ideal speedup
TARGET_PREFILL_OVERHEAD = 0.10  # selection's cost on prefill (masked engine vs dense)
TARGET_MASKED_OVERHEAD = 0.10  # masked decode vs dense decode


# -- model --------------------------------------------------------------------------
def build_model(args) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.neurons,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt_len + args.new_tokens + 16,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    if args.layout == "column-wide":
        column_major_wide(model)  # as load_model stores a float32 model on the CPU
    return model


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def decode_weight_bytes(model, sparse_layers: list[int], kept_fraction: list[float]) -> float:
    """Weight bytes one decode token reads (see the module docstring)."""
    embed = model.get_input_embeddings().weight
    total = sum(_bytes(p) for p in model.parameters() if p is not embed)
    total += embed.shape[1] * embed.element_size()  # one embedding row
    if model.get_output_embeddings().weight is embed:  # tied: lm_head reads it all
        total += _bytes(embed)
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    for idx, frac in zip(sparse_layers, kept_fraction, strict=True):
        total -= (1.0 - frac) * adapter.ffn_weight_bytes(layers[idx])
    return float(total)


# -- one run ------------------------------------------------------------------------
@torch.inference_mode()
def generate(model, prompt: torch.Tensor, new_tokens: int, clock) -> tuple[float, list[float]]:
    """Greedy prefill + decode loop on the KV cache; returns (prefill s, per-step s)."""
    cache = DynamicCache(config=model.config)
    t0 = clock()
    out = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    prefill = clock() - t0
    steps = []
    for _ in range(new_tokens):
        t = clock()
        out = model(input_ids=nxt, cache=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        steps.append(clock() - t)
    return prefill, steps


@torch.inference_mode()
def prefill_twice(model, prompt: torch.Tensor, clock) -> tuple[float, float]:
    """Two prefills in a row (inside one engine when sparse): (first s, second s). The
    second is the steady state of an engine serving many sequences (sliced mode reuses
    the previous sequence's gather buffers)."""
    times = []
    for _ in range(2):
        t0 = clock()
        model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        times.append(clock() - t0)
    return times[0], times[1]


class ForeignLoad:
    """CPU time other processes used while a block ran, in cores (Linux /proc/stat;
    nan elsewhere): the benchmark's noise indicator on a shared machine."""

    def __init__(self):
        self.cores = float("nan")

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        t = os.times()
        self._own, self._busy, self._wall = (
            t.user + t.system,
            self._busy_seconds(),
            time.perf_counter(),
        )
        return self

    def __exit__(self, *exc):
        busy = self._busy_seconds()
        if busy is not None and self._busy is not None:
            t = os.times()
            own = t.user + t.system - self._own
            self.cores = max(0.0, (busy - self._busy - own) / (time.perf_counter() - self._wall))


class Config:
    """A named way to run the model: dense, or under a SparseEngine."""

    def __init__(self, name: str, keep: float | None, mode: str | None, layers):
        self.name, self.keep, self.mode, self.layers = name, keep, mode, layers
        self.tps: list[float] = []  # decode tokens/s per round
        self.prefill_s: list[float] = []  # prefill seconds per round
        self.foreign: list[float] = []  # other processes' CPU use (cores) per kept run
        self.kept_fraction: list[float] | None = None

    def run(self, model, fn: Callable):
        if self.keep is None:
            return fn()
        with SparseEngine(model, self.keep, layers=self.layers, mode=self.mode) as engine:
            result = fn()
            n = engine.num_neurons
            self.kept_fraction = [c / n for c in engine.kept_counts()[-1].tolist()]
        return result

    def measure(self, model, fn: Callable, attempts: int, quiet: float):
        """Run ``fn`` under this configuration; while other processes use more than
        ``quiet`` cores, retry (up to ``attempts`` runs) and keep the quietest run."""
        best = None
        for _ in range(max(attempts, 1)):
            with ForeignLoad() as load:
                result = self.run(model, fn)
            if best is None or load.cores < best[0]:
                best = (load.cores, result)
            if not load.cores > quiet:  # also stops on nan (no /proc/stat)
                break
        self.foreign.append(best[0])
        return best[1]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs) -> str:
    """Half the interquartile range relative to the median (a noise indicator)."""
    if len(xs) < 2:
        return "n/a"
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return f"±{(q[2] - q[0]) / 2 / statistics.median(xs):.0%}"


def rotated(items: list, rnd: int) -> list:
    shift = rnd % len(items)
    return items[shift:] + items[:shift]


# -- main ---------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run: 4 layers, 3 rounds")
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--neurons", type=int, default=8192, help="FFN intermediate size N")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="column-wide",
        help="weights of the wide layers: column-major as load_model stores float32 on the "
        "CPU (default), or row-major as checkpoints are",
    )
    p.add_argument("--layers", default=None, help="sparse layer range START:STOP (default: all)")
    p.add_argument("--keeps", default="1.0,0.6,0.4,0.2", help="kept fractions for sliced")
    p.add_argument("--masked-keep", type=float, default=0.4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (after 1 warm-up)")
    p.add_argument("--prefill-rounds", type=int, default=15)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: decode is memory-bound and one core already draws the "
        "VM's full bandwidth; on a shared machine more threads make timings erratic)",
    )
    p.add_argument(
        "--quiet",
        type=float,
        default=0.25,
        help="retry a run while other processes use more CPU cores than this",
    )
    p.add_argument("--attempts", type=int, default=1, help="runs per measurement at most")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="cpu",
        help="wall: elapsed time; cpu (default): this process's CPU time, which ignores the time other "
        "processes hold the cores (meaningful with --threads 1 only: idle OpenMP threads "
        "spin and would count)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.num_layers, args.rounds, args.prefill_rounds, args.new_tokens = 4, 3, 5, 16
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    keeps = [float(k) for k in args.keeps.split(",")]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        print("warning: --clock cpu counts the spinning of idle OpenMP threads; use --threads 1")

    t0 = time.perf_counter()
    model = build_model(args)
    num_layers = model.config.num_hidden_layers
    layers = args.layers or f"0:{num_layers}"
    sparse_layers = resolve_layers(layers, num_layers)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(3, args.vocab, (1, args.prompt_len), generator=gen)
    dense_bytes = decode_weight_bytes(model, sparse_layers, [1.0] * len(sparse_layers))

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}"
    )
    print(
        f"model: Llama, {num_layers} layers, hidden {args.hidden}, N={args.neurons}, "
        f"{args.heads}/{args.kv_heads} heads, vocab {args.vocab}, float32; "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params "
        f"(built in {time.perf_counter() - t0:.1f}s)"
    )
    print(
        f"sparse layers {layers} ({len(sparse_layers)} of {num_layers}); prompt {args.prompt_len} "
        f"tokens, {args.new_tokens} decode tokens, batch 1, {args.rounds} rounds + 1 warm-up, "
        f"{args.clock} clock"
    )
    ffn = adapter_for(model).ffn_weight_bytes(adapter_for(model).decoder_layers(model)[0])
    print(
        f"weight bytes per dense decode token: {dense_bytes / 1e6:.0f} MB "
        f"(FFN {ffn * num_layers / dense_bytes:.0%})\n"
    )

    # ---- decode ----
    dense = Config("dense", None, None, layers)
    sliced = [Config(f"sliced {k:g}", k, "sliced", layers) for k in keeps]
    masked = Config(f"masked {args.masked_keep:g}", args.masked_keep, "masked", layers)
    configs = [dense, *sliced, masked]

    def decode_run():
        return generate(model, prompt, args.new_tokens, clock)

    for rnd in range(args.rounds + 1):  # round 0 warms up (allocator, caches, MKL)
        for cfg in rotated(configs, rnd):
            prefill, steps = cfg.measure(model, decode_run, args.attempts, args.quiet)
            if rnd == 0:
                cfg.foreign.clear()
                continue
            cfg.tps.append(1.0 / statistics.median(steps))
            cfg.prefill_s.append(prefill)
        if rnd == 0:
            print("  warm-up round done", flush=True)
        else:
            print(
                f"  round {rnd}: "
                + ", ".join(f"{c.name} {c.tps[-1]:.1f}" for c in configs)
                + f" tok/s; other processes {max(c.foreign[-1] for c in configs):.2f} cores",
                flush=True,
            )

    def paired(cfg, base, values=lambda c: c.tps):
        return median([a / b for a, b in zip(values(cfg), values(base), strict=True)])

    print(
        "\nDecode, batch 1. tok/s = 1 / median step time of a run; median over rounds "
        "(± half the interquartile range); speedup = median of per-round ratios"
    )
    header = (
        f"{'keep':>5} {'kept':>6} {'dense tok/s':>14} {'sliced tok/s':>14} "
        f"{'speedup':>8} {'ideal':>6} {'% ideal':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for cfg in sliced:
        frac = cfg.kept_fraction
        ideal = dense_bytes / decode_weight_bytes(model, sparse_layers, frac)
        sp = paired(cfg, dense)
        rows.append((cfg.keep, sp, ideal))
        print(
            f"{cfg.keep:>5g} {sum(frac) / len(frac):>6.3f} "
            f"{median(dense.tps):>8.2f} {spread(dense.tps):>5} "
            f"{median(cfg.tps):>8.2f} {spread(cfg.tps):>5} "
            f"{sp:>7.2f}x {ideal:>5.2f}x {sp / ideal:>8.0%}"
        )
    # Least squares: seconds per token = bytes / bandwidth + fixed. "fixed" is what does not
    # shrink with the weights read (Python and framework dispatch, attention over the cache).
    pts = [(dense_bytes, 1.0 / median(dense.tps))]
    pts += [
        (decode_weight_bytes(model, sparse_layers, c.kept_fraction), 1.0 / median(c.tps))
        for c in sliced
    ]
    mx, my = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    fixed = my - slope * mx
    print(
        f"fit over dense + sliced: time/token = bytes / {1e-9 / slope:.1f} GB/s + "
        f"{fixed * 1e3:.1f} ms fixed ({fixed * median(dense.tps):.0%} of a dense token)"
    )
    masked_overhead = paired(dense, masked) - 1.0  # time ratio masked / dense
    print(
        f"\nmasked decode at keep {masked.keep:g}: {median(masked.tps):.2f} tok/s {spread(masked.tps)}, "
        f"{masked_overhead:+.1%} time vs dense"
    )
    foreign = [f for c in configs for f in c.foreign]
    print(
        f"other processes during the kept decode runs: median {median(foreign):.2f} cores, "
        f"max {max(foreign):.2f}"
    )

    # ---- prefill (selection overhead) ----
    pre_dense = Config("dense", None, None, layers)
    pre_masked = Config(f"masked {args.masked_keep:g}", args.masked_keep, "masked", layers)
    pre_sliced = Config(f"sliced {args.masked_keep:g}", args.masked_keep, "sliced", layers)
    pre = [pre_dense, pre_masked, pre_sliced]
    first: dict[str, list[float]] = {c.name: [] for c in pre}
    for rnd in range(args.prefill_rounds + 1):
        for cfg in rotated(pre, rnd):
            t1, t2 = cfg.measure(
                model, lambda: prefill_twice(model, prompt, clock), args.attempts, args.quiet
            )
            if rnd == 0:
                cfg.foreign.clear()
            else:
                cfg.prefill_s.append(t2)
                first[cfg.name].append(t1)

    def overhead(cfg):
        return paired(cfg, pre_dense, lambda c: c.prefill_s) - 1.0

    foreign = [f for c in pre for f in c.foreign]
    print(
        f"\nprefill of {args.prompt_len} tokens, {args.prefill_rounds} rounds, steady state "
        f"(other processes: median {median(foreign):.2f} cores, max {max(foreign):.2f}):"
    )
    print(f"  dense: {median(pre_dense.prefill_s) * 1e3:.0f} ms {spread(pre_dense.prefill_s)}")
    for cfg, what in ((pre_masked, "selection"), (pre_sliced, "selection + weight gather")):
        print(
            f"  {cfg.name}: {median(cfg.prefill_s) * 1e3:.0f} ms {spread(cfg.prefill_s)}, "
            f"{overhead(cfg):+.1%} vs dense ({what})"
        )
    first_sliced = (
        median([a / b for a, b in zip(first[pre_sliced.name], first[pre_dense.name], strict=True)])
        - 1.0
    )
    print(
        f"  {pre_sliced.name}, first sequence of a new engine (fresh gather buffers): "
        f"{median(first[pre_sliced.name]) * 1e3:.0f} ms, {first_sliced:+.1%} vs dense"
    )

    # ---- verdict ----
    print("\ntargets:")
    verdicts = []
    for keep, sp, ideal in rows:
        if abs(keep - 0.4) < 1e-9:
            verdicts.append(
                (
                    f"sliced decode at keep 0.4 reaches {sp / ideal:.0%} of the ideal "
                    f"speedup (>= {TARGET_IDEAL_FRACTION:.0%})",
                    sp / ideal >= TARGET_IDEAL_FRACTION,
                )
            )
    verdicts.append(
        (
            f"selection adds {overhead(pre_masked):+.1%} to prefill "
            f"(< {TARGET_PREFILL_OVERHEAD:.0%})",
            overhead(pre_masked) < TARGET_PREFILL_OVERHEAD,
        )
    )
    verdicts.append(
        (
            f"masked decode costs {masked_overhead:+.1%} over dense "
            f"(<= {TARGET_MASKED_OVERHEAD:.0%})",
            masked_overhead <= TARGET_MASKED_OVERHEAD,
        )
    )
    for text, good in verdicts:
        print(f"  {'met   ' if good else 'MISSED'} {text}")
    return 0 if all(good for _, good in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
