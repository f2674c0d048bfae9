"""Memory bandwidth of a float32 matrix-vector product at each matrix shape of a model.

    .venv/bin/python benchmarks/gemv_shapes.py                        # smollm2-135m's shapes
    .venv/bin/python benchmarks/gemv_shapes.py --model qwen2.5-0.5b
    .venv/bin/python benchmarks/gemv_shapes.py --shape 8192x2048 --shape 576x1536

For every distinct ``nn.Linear`` weight shape (out x in) of the model, and the 8192 x 2048
matrix that ``decode_speed.py`` takes as the machine's bandwidth, it times one vector
times the matrix in two layouts:

- "as stored": ``F.linear(x, W)`` with W (out, in) row-major, as the model runs it, so
  each output is a dot product over one row of ``in`` values;
- "transposed": ``x @ Wt`` with Wt = W.t() stored contiguous (in, out), so the kernel
  sweeps rows of ``out`` values and accumulates.

Both read the same bytes; the GB/s is those bytes over the median call time. The calls
cycle through as many copies of the matrix as fill --cycle-mb, so that every call reads
memory as a decode step does. Only random matrices are built: the model is read for its
shapes (``--shape`` skips it). The two layouts add the products in different orders, so
their outputs can differ in the last bits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


def model_shapes(name: str) -> list[tuple[int, int, int]]:
    """(out, in, how many) for every distinct nn.Linear weight shape of the model."""
    from autosparse.models import load_model

    model = load_model(name, device="cpu", dtype="float32").model
    counts: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            shape = tuple(module.weight.shape)
            counts[shape] = counts.get(shape, 0) + 1
    return [(out, inp, n) for (out, inp), n in counts.items()]


def bandwidth(
    out: int, inp: int, transposed: bool, cycle_mb: float, calls: int
) -> tuple[float, float]:
    """(median microseconds per call, GB/s) of one float32 vector times an out x in matrix."""
    nbytes = out * inp * 4
    copies = max(2, int(cycle_mb * 1e6 // nbytes))
    shape = (inp, out) if transposed else (out, inp)
    matrices = [torch.randn(*shape) for _ in range(copies)]
    x = torch.randn(1, inp)

    def call(matrix: torch.Tensor) -> torch.Tensor:
        return x @ matrix if transposed else torch.nn.functional.linear(x, matrix)

    for matrix in matrices:
        call(matrix)
    times = []
    for index in range(max(calls, copies)):
        matrix = matrices[index % copies]
        start = time.perf_counter()
        call(matrix)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return median * 1e6, nbytes / median / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="alias, hub id or folder")
    p.add_argument("--shape", action="append", default=[], help="OUTxIN instead of a model's")
    p.add_argument("--cycle-mb", type=float, default=256, help="bytes cycled through per shape")
    p.add_argument("--calls", type=int, default=64, help="timed calls per shape and layout")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shape:
        try:
            shapes = [(*map(int, s.lower().split("x")), 1) for s in args.shape]
        except ValueError:
            p.error("--shape takes OUTxIN, e.g. 8192x2048")
        source = "given shapes"
    else:
        shapes = model_shapes(args.model)
        source = args.model
    shapes.append((8192, 2048, 0))  # the reference matrix of decode_speed.py
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{source}: float32 GEMV, batch 1, {torch.get_num_threads()} threads, load average "
        f"{load}; median of {args.calls} calls"
    )
    print(f"{'out x in':>14} {'count':>5} {'MB':>7}   as stored (F.linear)   transposed (x @ Wt)")
    with torch.no_grad():
        for out, inp, n in shapes:
            stored = bandwidth(out, inp, False, args.cycle_mb, args.calls)
            flipped = bandwidth(out, inp, True, args.cycle_mb, args.calls)
            count = str(n) if n else "ref"
            print(
                f"{f'{out}x{inp}':>14} {count:>5} {out * inp * 4 / 1e6:7.1f}   "
                f"{stored[0]:7.0f} us {stored[1]:5.1f} GB/s    "
                f"{flipped[0]:7.0f} us {flipped[1]:5.1f} GB/s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
