"""Per-forward and per-layer state owned by a SparseEngine (no module globals)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from autosparse.engine.selection import Selection, select_core_neurons
from autosparse.errors import ConfigError


@dataclass
class ForwardContext:
    """What the current forward call is.

    prefill: the call starts new sequences (no cached tokens): layers select from
    the ``prompt`` tokens. ``prompt`` (B, T) marks prompt tokens that are not padding;
    ``continuation`` (B, T) marks tokens that run sparse. In a plain prefill nothing
    runs sparse; in continuation scoring (prompt + answer in one pass) the answer does;
    in a decode step every token does.
    """

    batch: int
    length: int
    prefill: bool
    prompt: torch.Tensor | None = None
    continuation: torch.Tensor | None = None
    kept: torch.Tensor | None = None  # (B, L) kept counts, filled by the layers at prefill


@dataclass
class LayerRuntime:
    """One sparse layer: its keep ratio, and the current batch's selection."""

    engine: object  # the owning SparseEngine (for .context and settings)
    layer: int  # absolute decoder-layer index
    slot: int  # position among the sparse layers
    keep: float
    selection: Selection | None = None
    sliced: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def context(self) -> ForwardContext:
        ctx = self.engine.context
        if ctx is None:
            raise RuntimeError("sparse layer called outside a model forward pass")
        return ctx

    @property
    def mode(self) -> str:
        return self.engine.mode

    @property
    def dense(self) -> bool:
        """A keep ratio of 1 keeps every neuron: the layer runs dense."""
        return self.keep >= 1.0

    def select(self, acts: torch.Tensor) -> Selection:
        """Select this batch's core neurons from prefill activations ``acts`` (B, T, N)."""
        ctx = self.context
        n = acts.shape[-1]
        if self.dense:
            bsz = acts.shape[0]
            order = torch.arange(n, device=acts.device).expand(bsz, n)
            sel = Selection(
                order=order,
                kept=torch.full((bsz,), n, dtype=torch.long, device=acts.device),
                mask=torch.ones(bsz, n, dtype=torch.bool, device=acts.device),
            )
        else:
            sel = select_core_neurons(acts, ctx.prompt, self.keep, self.engine.token_ratio)
        self.selection = sel
        self.sliced = {}
        if ctx.kept is not None:
            ctx.kept[:, self.slot] = sel.kept.to(ctx.kept.device)
        return sel

    def decode_selection(self, batch: int) -> Selection:
        sel = self.selection
        if sel is None:
            raise ConfigError(
                "a continuation step ran before any prefill; generation needs the KV cache "
                "(use_cache=True) so the engine can tell prefill from decode"
            )
        if sel.mask.shape[0] != batch:
            raise ConfigError(
                f"decode batch of {batch} rows after a prefill of {sel.mask.shape[0]}; "
                "beam search and batch reshuffling are not supported"
            )
        return sel

    def continuation_keep(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Multiplier (B, T, N) that zeroes unkept neurons on continuation tokens of a
        prefill call, or None when no token of the call runs sparse."""
        ctx = self.context
        if ctx.continuation is None or self.selection is None:
            return None
        keep = self.selection.mask.unsqueeze(1) | ~ctx.continuation.unsqueeze(-1)
        return keep.to(dtype)
