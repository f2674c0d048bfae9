"""Memory layout of the weights of wide linear layers, for fast decoding on the CPU.

A decode step multiplies one vector by every weight matrix, so it runs at the bandwidth
the matrix-vector product reaches. On the CPU (MKL, float32) that depends on the layout:
``F.linear`` with a row-major (out, in) weight takes one dot product per output over a
row of ``in`` values, and with short rows (576 or 896 values) it reaches 13-15 GB/s on
this project's machine, against 21-25 GB/s for the same bytes when the kernel sweeps
rows of ``out`` values, i.e. with the weight stored column-major (``W.t()`` contiguous).
The layers with more outputs than inputs (the FFN's gate/up or fc1, and the lm_head over
the vocabulary) hold most of a decode step's bytes and gain the most
(``benchmarks/gemv_shapes.py``; numbers in docs/performance.md).

``column_major_wide`` stores those weights column-major: the same values and shape (the
parameter is a transposed view of a contiguous transposed copy), so every caller works
unchanged, tied weights stay tied and nothing but the memory order moves. The products
add in another order, so outputs can differ in the last bits from the row-major ones.
``weight_layout`` is the reversible form. ``models.load_model`` applies it to float32
models on the CPU; other devices and dtypes keep the checkpoint's layout (not measured).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

#: the layouts ``weight_layout`` accepts
LAYOUTS = ("row", "column-wide")


def wide_linears(model: nn.Module) -> list[nn.Linear]:
    """Every ``nn.Linear`` of the model with more outputs than inputs, once each."""
    seen: set[int] = set()
    out = []
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features > module.in_features:
            if id(module.weight) not in seen:
                seen.add(id(module.weight))
                out.append(module)
    return out


def is_column_major(weight: torch.Tensor) -> bool:
    """True when the 2-D ``weight`` is stored column-major (and not also row-major)."""
    return weight.dim() == 2 and weight.t().is_contiguous() and not weight.is_contiguous()


def _set(module: nn.Linear, column: bool) -> bool:
    """Store the module's weight in the layout; True if it moved."""
    weight = module.weight.data
    if column == is_column_major(weight):
        return False
    if column:
        module.weight.data = weight.t().contiguous().t()
    else:
        module.weight.data = weight.contiguous()
    return True


def column_major_wide(model: nn.Module) -> int:
    """Store the weights of the model's wide linear layers column-major; how many moved."""
    return sum(_set(module, True) for module in wide_linears(model))


def default_layout(device: torch.device | str, dtype: torch.dtype) -> str:
    """The layout ``load_model`` gives a model: column-major wide layers for float32 on
    the CPU, where it was measured to help, else the checkpoint's row-major one."""
    return "column-wide" if torch.device(device).type == "cpu" and dtype == torch.float32 else "row"


@contextmanager
def weight_layout(model: nn.Module, layout: str) -> Iterator[int]:
    """Give the wide linear layers ``layout`` ("row" or "column-wide") inside the block and
    restore each one's previous layout after it. Yields how many weights moved."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    column = layout == "column-wide"
    moved = [module for module in wide_linears(model) if _set(module, column)]
    try:
        yield len(moved)
    finally:
        for module in moved:
            _set(module, not column)
