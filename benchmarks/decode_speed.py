"""End-to-end decode speed of a real model against the machine's memory bandwidth.

    .venv/bin/python benchmarks/decode_speed.py                      # smollm2-135m, ~3-5 min
    .venv/bin/python benchmarks/decode_speed.py --model qwen2.5-0.5b
    .venv/bin/python benchmarks/decode_speed.py --quick              # a smoke run (~1 min)
    .venv/bin/python benchmarks/decode_speed.py --json               # one JSON object

One run measures, side by side in every round (the order rotating between rounds):

- the memory bandwidth a plain float32 GEMV reaches (an 8192 x 2048 matrix times a
  vector: 64 MiB read per call, cycling through --gemv-copies matrices so that no call
  reads from cache; median over --gemv-repeats calls), in GB/s, with the matrix stored
  row-major and column-major; the faster of the two is the machine's bandwidth;
- the model's own matrix-vector products alone ("matmuls alone"): one vector times
  every ``nn.Linear`` of the model in module order (the lm_head included), back to back
  with nothing else, median over --chain-repeats passes, in the loaded layout and
  row-major. It is what a decode step costs
  if attention, norms, activations and the framework cost nothing while every matrix
  still runs as its own GEMV, so it bounds any decoder that does not fuse matrices;
  small matrices reach less bandwidth than the 64 MiB one;
- batch-1 greedy decode of the model, dense, through ``model.generate`` ("hf") and
  through autosparse's lean decoder ("lean", ``autosparse.decoding``), with --compile
  also the lean decoder with its step compiled; and the lean decoder with every weight
  row-major as the checkpoint stores it ("lean row-major"), where ``load_model`` stored
  the wide layers column-major (float32 on the CPU, ``autosparse.layout``);
- the lean decoder under CoreInfer keep --keep, sliced, on the model's default sparse
  layers.

From these: the weight bytes one decode step reads (``autosparse.bench.
decode_step_bytes``: every weight once, one embedding row, and on the sparse layers
only the kept neurons' share of the FFN), the bandwidth-limited decode rate
(GEMV GB/s / bytes per step), each dense decoder's rate as a percentage of that limit,
and the sliced run's measured speedup over lean dense as a percentage of the ideal
speedup (dense bytes / sparse bytes, as ``autosparse bench`` reports it).

Decode rate = (new tokens - 1) / the time from the first new token to the last (the
first one is the prefill's), per row of a --batch-size batch (a decode step reads the
weights once for the whole batch, so the limit is the same); wall clock at torch's thread count (--threads to change
it). Rates are medians over --rounds rounds after one warm-up round, with their min-max;
ratios (percent of the limit, speedup) are medians of per-round ratios, so the
bandwidth and the rates they divide were measured in the same round. On a shared
machine, run it when nothing else runs: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from autosparse.bench import decode_step_bytes, synthetic_prompt_ids, time_generation  # noqa: E402
from autosparse.layout import is_column_major, weight_layout, wide_linears  # noqa: E402
from autosparse.methods import Method  # noqa: E402
from autosparse.models import load_model  # noqa: E402

GEMV_ROWS, GEMV_COLUMNS = 8192, 2048


def gemv_bandwidth(repeats: int, copies: int, transposed: bool = False) -> float:
    """GB/s of a float32 matrix-vector product: one matrix's bytes over the median time.
    The calls cycle through ``copies`` matrices, more bytes than the last-level cache
    holds, so that every call reads memory, as a decode step reads its weights. With
    ``transposed`` the matrix is stored column-major (the vector times its transpose)."""
    shape = (GEMV_COLUMNS, GEMV_ROWS) if transposed else (GEMV_ROWS, GEMV_COLUMNS)
    matrices = [torch.randn(*shape) for _ in range(copies)]
    vector = torch.randn(GEMV_COLUMNS)
    out = torch.empty(GEMV_ROWS)

    def call(matrix: torch.Tensor) -> None:
        if transposed:
            torch.mv(matrix.t(), vector, out=out)
        else:
            torch.mv(matrix, vector, out=out)

    for matrix in matrices:
        call(matrix)
    times = []
    for index in range(repeats):
        matrix = matrices[index % copies]
        start = time.perf_counter()
        call(matrix)
        times.append(time.perf_counter() - start)
    return matrices[0].numel() * matrices[0].element_size() / statistics.median(times) / 1e9


def linear_chain(model) -> tuple[list[tuple[torch.Tensor, torch.Tensor | None]], int]:
    """Every ``nn.Linear`` of the model in module order with its bias, and their bytes."""
    chain = [
        (module.weight, module.bias)
        for module in model.modules()
        if isinstance(module, torch.nn.Linear)
    ]
    nbytes = sum(sum(t.numel() * t.element_size() for t in pair if t is not None) for pair in chain)
    return chain, nbytes


def chain_rate(chain, repeats: int) -> float:
    """Passes per second of one vector through every matrix of ``chain`` (median)."""
    inputs = [torch.randn(1, weight.shape[1], dtype=weight.dtype) for weight, _ in chain]

    def one_pass() -> None:
        for (weight, bias), x in zip(chain, inputs, strict=True):
            torch.nn.functional.linear(x, weight, bias)

    one_pass()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return 1 / statistics.median(times)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="alias, hub id or folder")
    p.add_argument("--quick", action="store_true", help="short run: 16 new tokens, 2 rounds")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=1, help="rows decoded together")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after 1 warm-up)")
    p.add_argument("--keep", type=float, default=0.4, help="CoreInfer keep ratio, sliced")
    p.add_argument("--gemv-repeats", type=int, default=32)
    p.add_argument(
        "--gemv-copies", type=int, default=8, help="GEMV matrices cycled through (64 MiB each)"
    )
    p.add_argument(
        "--chain-repeats", type=int, default=10, help="passes of the matmuls-alone chain"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="also time the compiled lean step")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.rounds, args.gemv_repeats, args.chain_repeats = 16, 2, 16, 4
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device="cpu", dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    vocab = min(int(model.config.vocab_size), len(tokenizer))
    ids = synthetic_prompt_ids(
        vocab, args.batch_size, args.prompt_tokens, args.seed, list(tokenizer.all_special_ids)
    )
    pad = tokenizer.pad_token_id
    sliced = Method.coreinfer(args.keep, mode="sliced")
    configs = ["hf", "lean"] + (["lean compiled"] if args.compile else [])
    column = any(is_column_major(m.weight) for m in wide_linears(model))
    if column:
        configs.append("lean row-major")
    sparse_config = f"lean sliced keep {args.keep:g}"
    configs.append(sparse_config)
    if column:
        configs.append(f"{sparse_config} row-major")

    def run(config: str) -> float:
        """One generation of the config; its decode rate in steps/s (tokens/s per row)."""
        layout = "row" if config.endswith("row-major") else "column-wide" if column else "row"
        if config.startswith("lean sliced"):
            with weight_layout(model, layout), sliced.apply(model) as engine:
                got = time_generation(model, ids, new_tokens=args.new_tokens, pad_token_id=pad)
                densities.append(engine.layer_density())
                layers[:] = engine.layers
        elif config == "lean row-major":
            with weight_layout(model, "row"):
                got = time_generation(model, ids, new_tokens=args.new_tokens, pad_token_id=pad)
        else:
            got = time_generation(
                model,
                ids,
                new_tokens=args.new_tokens,
                pad_token_id=pad,
                decoder="hf" if config == "hf" else "lean",
                compile=config == "lean compiled",
            )
        prefills[config].append(got.prefill)
        return (args.new_tokens - 1) / got.decode

    densities: list[list[float]] = []
    layers: list[int] = []
    rates: dict[str, list[float]] = {c: [] for c in configs}
    prefills: dict[str, list[float]] = {c: [] for c in configs}
    bandwidth: list[float] = []
    gemv: dict[str, list[float]] = {"row-major": [], "column-major": []}
    chain, chain_bytes = linear_chain(model)
    chain_rates: list[float] = []
    row_chain_rates: list[float] = []
    with torch.no_grad():
        for config in configs:  # warm-up (and compilation)
            run(config)
        for index in range(args.rounds):
            order = configs[index % len(configs) :] + configs[: index % len(configs)]
            for layout, values in gemv.items():
                values.append(
                    gemv_bandwidth(args.gemv_repeats, args.gemv_copies, layout == "column-major")
                )
            bandwidth.append(max(values[-1] for values in gemv.values()))
            chain_rates.append(chain_rate(chain, args.chain_repeats))
            if column:
                with weight_layout(model, "row"):
                    row_chain_rates.append(chain_rate(linear_chain(model)[0], args.chain_repeats))
            for config in order:
                rates[config].append(run(config))
            print(f"round {index + 1}/{args.rounds} done", file=sys.stderr)

    dense_bytes = decode_step_bytes(model)
    mean_density = [statistics.fmean(column) for column in zip(*densities, strict=True)]
    sparse_bytes = decode_step_bytes(model, dict(zip(layers, mean_density, strict=True)))
    ideal = dense_bytes / sparse_bytes
    limit = [bw * 1e9 / dense_bytes for bw in bandwidth]  # tokens/s per round
    result = {
        "model": loaded.source,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "gemv_gb_per_s": spread(bandwidth),
        "gemv_gb_per_s_by_layout": {layout: spread(v) for layout, v in gemv.items()},
        "decode_bytes": {"dense": dense_bytes, "sparse": sparse_bytes},
        "bandwidth_limited_tokens_per_s": spread(limit),
        "matmuls_alone": {
            "matrices": len(chain),
            "bytes": chain_bytes,
            "tokens_per_s": spread(chain_rates),
            "gb_per_s": spread([r * chain_bytes / 1e9 for r in chain_rates]),
            "percent_of_limit": statistics.median(
                100 * r / lim for r, lim in zip(chain_rates, limit, strict=True)
            ),
        },
        "layout": "column-major wide layers" if column else "row-major",
        "batch_size": args.batch_size,
        "tokens_per_s": {c: spread(v) for c, v in rates.items()},
        "prefill_seconds": {c: spread(v) for c, v in prefills.items()},
        "percent_of_limit": {
            c: statistics.median(100 * r / lim for r, lim in zip(v, limit, strict=True))
            for c, v in rates.items()
            if not c.startswith("lean sliced")
        },
        "percent_of_matmuls_alone": {
            c: statistics.median(100 * r / m for r, m in zip(v, chain_rates, strict=True))
            for c, v in rates.items()
            if not c.startswith("lean sliced")
        },
        "sparse_layers": layers,
        "realized_density": statistics.fmean(mean_density),
        "ideal_speedup": ideal,
        "sliced_speedup": statistics.median(
            s / d for s, d in zip(rates[sparse_config], rates["lean"], strict=True)
        ),
    }
    result["percent_of_ideal"] = 100 * result["sliced_speedup"] / ideal
    if column:
        result["matmuls_alone_row_major"] = {
            "tokens_per_s": spread(row_chain_rates),
            "percent_of_limit": statistics.median(
                100 * r / lim for r, lim in zip(row_chain_rates, limit, strict=True)
            ),
        }
        result["column_over_row_major"] = statistics.median(
            c / r for c, r in zip(rates["lean"], rates["lean row-major"], strict=True)
        )
        sparse_row = rates[f"{sparse_config} row-major"]
        result["sliced_speedup_row_major"] = statistics.median(
            s / d for s, d in zip(sparse_row, rates["lean row-major"], strict=True)
        )
        result["sliced_column_over_row_major"] = statistics.median(
            c / r for c, r in zip(rates[sparse_config], sparse_row, strict=True)
        )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0

    def cell(s: dict, digits: int = 2) -> str:
        return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"

    load = ", ".join(f"{x:.2f}" for x in result["load_average"])
    print(
        f"{result['model']}: float32, batch {args.batch_size}, {args.prompt_tokens}-token prompt, "
        f"{args.new_tokens} new tokens, {result['threads']} threads, load average {load}; "
        f"median (min-max) of {args.rounds} rounds"
    )
    by_layout = result["gemv_gb_per_s_by_layout"]
    print(
        f"GEMV {GEMV_ROWS}x{GEMV_COLUMNS} float32: {cell(result['gemv_gb_per_s'])} GB/s, the "
        f"faster layout of each round (row-major {cell(by_layout['row-major'])}, column-major "
        f"{cell(by_layout['column-major'])})"
    )
    print(
        f"weight bytes per decode step: dense {dense_bytes / 1e6:.1f} MB; bandwidth-limited "
        f"decode {cell(result['bandwidth_limited_tokens_per_s'])} tokens/s"
    )
    alone = result["matmuls_alone"]
    print(f"weights: {result['layout']}")
    print(
        f"  {'matmuls alone':<32} {cell(alone['tokens_per_s'])} passes/s  "
        f"{alone['percent_of_limit']:.0f}% of the limit ({alone['matrices']} matrices, "
        f"{alone['bytes'] / 1e6:.1f} MB, {cell(alone['gb_per_s'])} GB/s)"
    )
    if column:
        row = result["matmuls_alone_row_major"]
        print(
            f"  {'matmuls alone row-major':<32} {cell(row['tokens_per_s'])} passes/s  "
            f"{row['percent_of_limit']:.0f}% of the limit"
        )
    for config in configs:
        line = (
            f"  {config:<32} prefill {result['prefill_seconds'][config]['median']:6.3f} s  "
            f"{cell(result['tokens_per_s'][config])} tokens/s"
        )
        if config in result["percent_of_limit"]:
            line += (
                f"  {result['percent_of_limit'][config]:.0f}% of the limit, "
                f"{result['percent_of_matmuls_alone'][config]:.0f}% of the matmuls alone"
            )
        print(line)
    print(
        f"sliced keep {args.keep:g} on layers {layers[0]}-{layers[-1]}: realized density "
        f"{result['realized_density']:.3f}, sparse {sparse_bytes / 1e6:.1f} MB per step, "
        f"ideal speedup {ideal:.2f}x, measured {result['sliced_speedup']:.2f}x over lean dense "
        f"= {result['percent_of_ideal']:.0f}% of ideal"
    )
    if column:
        print(
            f"column-major wide layers over row-major: lean {result['column_over_row_major']:.2f}x,"
            f" sliced {result['sliced_column_over_row_major']:.2f}x (sliced over lean dense, "
            f"row-major: {result['sliced_speedup_row_major']:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
