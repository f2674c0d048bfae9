"""Per-forward and per-layer state owned by a SparseEngine (no module globals)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from autosparse.engine.selection import Selection, rank_selection, selection_statistics
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

    @property
    def gathers(self) -> bool:
        """Whether this call runs on gathered (sliced) weights. Gathering copies the kept
        rows once per sequence and pays back only over decode steps, so a prefill that
        scores a continuation, and a pass that scores one from a preselected prompt,
        compute masked instead (the same outputs up to summation order)."""
        if self.mode != "sliced" or self.dense:
            return False
        ctx = self.context
        if ctx.prefill:
            return ctx.continuation is None
        return not self.engine.single_pass

    def select(
        self,
        acts: torch.Tensor,
        down_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Selection:
        """Select this batch's core neurons from prefill activations ``acts`` (B, T, N).
        ``down_input`` turns ``acts`` into the down projection's input where the two
        differ (OPT's ReLU); GRIFFIN ranks that input, CoreInfer ranks ``acts``."""
        ctx = self.context
        engine = self.engine
        collected = engine.collected
        if self.dense and collected is None:
            return self.install_dense(acts.shape[0], acts.shape[-1], acts.device)
        if engine.selector == "griffin" and down_input is not None:
            acts = down_input(acts)
        votes, mass = selection_statistics(engine.selector, acts, ctx.prompt, engine.token_ratio)
        if collected is not None:
            collected[self.slot] = (votes, mass)
        return self.install(votes, mass)

    def install(self, votes: torch.Tensor, mass: torch.Tensor) -> Selection:
        """Make the selection ranked from ``(votes, mass)`` (B, N) the current batch's."""
        if self.dense:
            return self.install_dense(votes.shape[0], votes.shape[1], votes.device)
        return self._set(rank_selection(votes, mass, self.keep))

    def install_dense(self, bsz: int, n: int, device: torch.device) -> Selection:
        order = torch.arange(n, device=device).expand(bsz, n)
        return self._set(
            Selection(
                order=order,
                kept=torch.full((bsz,), n, dtype=torch.long, device=device),
                mask=torch.ones(bsz, n, dtype=torch.bool, device=device),
            )
        )

    def _set(self, sel: Selection) -> Selection:
        self.selection = sel
        self.sliced = {}
        ctx = self.engine.context
        if ctx is not None and ctx.kept is not None:
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
