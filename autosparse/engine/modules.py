"""Sparse replacements for FFN modules. They hold the original module and a LayerRuntime.

Masked mode computes the dense FFN and zeroes the unkept neurons; sliced mode
gathers the kept rows/columns of the weights once per sequence, at prefill, and
decodes with those small contiguous matrices. Both give the same outputs up to
floating-point summation order. A pass that only scores a continuation computes
masked in either mode (``LayerRuntime.gathers``): its weights are used once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autosparse.engine.runtime import LayerRuntime
from autosparse.layout import is_column_major


def _padded_ids(runtime: LayerRuntime) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) ids of each sequence's kept neurons, K = the largest kept count, and a
    (B, K) float validity mask; sequences that keep fewer are padded (masked out later)."""
    sel = runtime.selection
    width = max(int(sel.kept.max()), 1)
    ids = sel.order[:, :width]
    valid = torch.arange(width, device=ids.device).unsqueeze(0) < sel.kept.unsqueeze(1)
    return ids, valid


def _buffer(spare: dict[str, torch.Tensor], key: str, shape: tuple, like: torch.Tensor):
    """An uninitialised (shape) tensor for ``key``: the previous batch's ``spare[key]`` when it
    fits, else a new one. Gathered weights are tens of MB per layer; allocating them afresh
    on every prefill pays a page fault per 4 KiB (large blocks go straight back to the OS
    when freed). The caller overwrites every element."""
    old = spare.pop(key, None)
    if (
        old is not None
        and old.shape == shape
        and old.dtype == like.dtype
        and old.device == like.device
        and (torch.is_inference_mode_enabled() or not old.is_inference())
    ):
        return old
    del old
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _gather_rows(weights: list[torch.Tensor], ids: torch.Tensor, spare: dict, key: str):
    """(B, len(weights) * K, D): for every sequence b, rows ``ids[b]`` of each weight (N, D),
    stacked. Written straight into one contiguous buffer (no concatenation copy).

    Weights stored column-major (``autosparse.layout``: float32 on the CPU) are gathered
    along their contiguous dimension into a (B, D, len(weights) * K) buffer, and the result
    is its transposed view: the same numbers, kept column-major, so that the sliced decode
    step multiplies in the layout that is fast for the dense one too."""
    bsz, width = ids.shape
    first = weights[0]
    rows = len(weights) * width
    if all(is_column_major(w) for w in weights):
        old = spare.get(key)
        if old is not None and old.dim() == 3 and old.transpose(1, 2).is_contiguous():
            spare[key] = old.transpose(1, 2)  # the buffer behind last batch's view
        out = _buffer(spare, key, (bsz, first.shape[1], rows), first)
        # index_select along the rows into a reused contiguous scratch, then one copy into
        # the strided slice: several times faster than selecting into the slice directly
        scratch = _buffer(spare, f"{key}.scratch", (first.shape[1], width), first)
        for b in range(bsz):
            for j, w in enumerate(weights):
                torch.index_select(w.t(), 1, ids[b], out=scratch)
                out[b, :, j * width : (j + 1) * width].copy_(scratch)
        spare[f"{key}.scratch"] = scratch
        return out.transpose(1, 2)
    out = _buffer(spare, key, (bsz, rows, first.shape[1]), first)
    for b in range(bsz):
        for j, w in enumerate(weights):
            torch.index_select(w, 0, ids[b], out=out[b, j * width : (j + 1) * width])
    return out


def _gather_columns_t(
    weight: torch.Tensor, ids: torch.Tensor, kept: torch.Tensor, spare: dict, key: str
) -> torch.Tensor:
    """(B, K, D_out): columns ``ids[b]`` of ``weight`` (D_out, N), transposed, rows past
    ``kept[b]`` (padding) zeroed. Gathering along the contiguous dimension and then
    transposing is several times faster than indexing rows of ``weight.t()``, which
    reads every element with a stride of N."""
    bsz, width = ids.shape
    out = _buffer(spare, key, (bsz, width, weight.shape[0]), weight)
    # a reused scratch: a fresh (D_out, K) result per sequence page-faults on every prefill
    scratch = _buffer(spare, f"{key}.scratch", (weight.shape[0], width), weight)
    for b in range(bsz):
        torch.index_select(weight, 1, ids[b], out=scratch)
        out[b].copy_(scratch.t())
        n = int(kept[b])
        if n < width:
            out[b, n:].zero_()
    spare[f"{key}.scratch"] = scratch
    return out


def _bmm_or_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """x (B, T, D_in) times per-sequence ``weight`` (B, D_out, D_in)^T (+ bias (B, D_out))."""
    if x.shape[0] == 1:
        return F.linear(x[0], weight[0], None if bias is None else bias[0]).unsqueeze(0)
    out = torch.bmm(x, weight.transpose(1, 2))
    return out if bias is None else out + bias.unsqueeze(1)


def _right_bmm(h: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """h (B, T, K) times per-sequence ``weight_t`` (B, K, D)."""
    if h.shape[0] == 1:
        return (h[0] @ weight_t[0]).unsqueeze(0)
    return torch.bmm(h, weight_t)


class SparseGatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` running only each sequence's core neurons."""

    def __init__(self, mlp: nn.Module, runtime: LayerRuntime):
        super().__init__()
        self.inner = mlp
        self.runtime = runtime
        self._spare: dict[str, torch.Tensor] = {}  # last gathered weights, reused if they fit

    def _dense_acts(self, x: torch.Tensor) -> torch.Tensor:
        m = self.inner
        return m.act_fn(m.gate_proj(x)) * m.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D)
        rt, m = self.runtime, self.inner
        ctx = rt.context
        if ctx.prefill:
            h = self._dense_acts(x)  # (B, T, N)
            rt.select(h)
            scale = rt.continuation_keep(h.dtype)
            if scale is not None:
                h = h * scale
            if rt.gathers:
                self._gather()
            return m.down_proj(h)
        sel = rt.decode_selection(x.shape[0])
        if rt.dense:
            return m(x)
        if not rt.gathers:
            h = self._dense_acts(x) * sel.mask.unsqueeze(1).to(x.dtype)
            return m.down_proj(h)
        if "gate_up" not in rt.sliced:  # selected without a prefill (engine.preselect)
            self._gather()
        w = rt.sliced
        gu = _bmm_or_linear(x, w["gate_up"], w.get("gate_up_bias"))  # (B, T, 2K)
        g, u = gu.chunk(2, dim=-1)
        h = m.act_fn(g) * u  # (B, T, K)
        y = _right_bmm(h, w["down_t"])  # (B, T, D)
        if m.down_proj.bias is not None:
            y = y + m.down_proj.bias
        return y

    @torch.no_grad()
    def _gather(self) -> None:
        m, rt = self.inner, self.runtime
        ids, _ = _padded_ids(rt)  # (B, K)
        spare, kept = self._spare, rt.selection.kept
        rt.sliced = {
            "gate_up": _gather_rows([m.gate_proj.weight, m.up_proj.weight], ids, spare, "gate_up"),
            "down_t": _gather_columns_t(m.down_proj.weight, ids, kept, spare, "down_t"),
        }  # (B, 2K, D) and (B, K, D)
        self._spare.update(rt.sliced)
        if m.gate_proj.bias is not None:
            rt.sliced["gate_up_bias"] = torch.cat([m.gate_proj.bias[ids], m.up_proj.bias[ids]], 1)


class SparseOPTFc1(nn.Module):
    """OPT's fc1 (input (B*T, D), output pre-ReLU activations). At prefill it selects;
    in sliced decode it computes only the kept rows."""

    def __init__(self, fc1: nn.Linear, runtime: LayerRuntime, activation=F.relu):
        super().__init__()
        self.inner = fc1
        self.runtime = runtime
        self.activation = activation  # the layer's own, between fc1 and fc2
        self._spare: dict[str, torch.Tensor] = {}  # last gathered weights, reused if they fit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        ctx = rt.context
        if ctx.prefill:
            a = self.inner(x)
            rt.select(a.view(ctx.batch, ctx.length, -1), down_input=self.activation)
            if rt.gathers:
                self._gather()
            return a
        rt.decode_selection(ctx.batch)
        if not rt.gathers:
            return self.inner(x)
        if "fc1" not in rt.sliced:  # selected without a prefill (engine.preselect)
            self._gather()
        w = rt.sliced
        a = _bmm_or_linear(x.view(ctx.batch, ctx.length, -1), w["fc1"], w.get("fc1_bias"))
        return a.reshape(ctx.batch * ctx.length, -1)  # (B*T, K)

    @torch.no_grad()
    def _gather(self) -> None:
        rt, fc1 = self.runtime, self.inner
        ids, _ = _padded_ids(rt)
        rt.sliced["fc1"] = _gather_rows([fc1.weight], ids, self._spare, "fc1")  # (B, K, D)
        self._spare["fc1"] = rt.sliced["fc1"]
        if fc1.bias is not None:
            rt.sliced["fc1_bias"] = fc1.bias[ids]


class SparseOPTFc2(nn.Module):
    """OPT's fc2 (input ReLU activations (B*T, N) or, sliced, (B*T, K)); bias stays whole."""

    def __init__(self, fc2: nn.Linear, runtime: LayerRuntime):
        super().__init__()
        self.inner = fc2
        self.runtime = runtime
        self._spare: dict[str, torch.Tensor] = {}  # last gathered weights, reused if they fit

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        rt, fc2 = self.runtime, self.inner
        ctx = rt.context
        if ctx.prefill:
            scale = rt.continuation_keep(h.dtype)
            if scale is not None:
                h = (h.view(ctx.batch, ctx.length, -1) * scale).view_as(h)
            if rt.gathers:
                self._gather()
            return fc2(h)
        sel = rt.decode_selection(ctx.batch)
        if rt.dense:
            return fc2(h)
        if not rt.gathers:
            h = h.view(ctx.batch, ctx.length, -1) * sel.mask.unsqueeze(1).to(h.dtype)
            return fc2(h.view(ctx.batch * ctx.length, -1))
        if "fc2_t" not in rt.sliced:  # selected without a prefill (engine.preselect)
            self._gather()
        y = _right_bmm(h.view(ctx.batch, ctx.length, -1), rt.sliced["fc2_t"])
        if fc2.bias is not None:
            y = y + fc2.bias
        return y.reshape(ctx.batch * ctx.length, -1)

    @torch.no_grad()
    def _gather(self) -> None:
        rt, fc2 = self.runtime, self.inner
        ids, _ = _padded_ids(rt)
        fc2_t = _gather_columns_t(fc2.weight, ids, rt.selection.kept, self._spare, "fc2_t")
        rt.sliced["fc2_t"] = fc2_t  # (B, K, D)
        self._spare["fc2_t"] = fc2_t
