"""SparseEngine: patch a Hugging Face causal LM for CoreInfer-style sparse decoding.

Usage::

    with SparseEngine(model, keep=0.4, layers="6:27") as engine:
        out = model.generate(**batch)           # prefill selects, decode runs sparse
        with engine.scoring(prompt_lengths):    # prompt + continuation in one pass
            logits = model(ids).logits
    engine.realized_density()

A forward call whose KV cache is empty (or absent) is a prefill: every sparse
layer runs dense on it and selects each sequence's core neurons from its prompt
tokens. Calls with a non-empty cache are decode steps and run only the kept
neurons. Leaving the ``with`` block restores the model exactly.

A prompt's dense pass can also be kept and reused (``engine.prompts``): inside
``engine.collecting()`` a prefill keeps each layer's selection statistics, and
``engine.preselect(statistics)`` selects from kept statistics without a prefill, so
that the next calls (given the prompts' KV cache) decode from there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from autosparse.adapters import adapter_for
from autosparse.engine.config import (
    LayerRange,
    check_mode,
    check_selector,
    check_token_ratio,
    resolve_keep,
    resolve_layers,
)
from autosparse.engine.runtime import ForwardContext, LayerRuntime
from autosparse.errors import ConfigError


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])  # legacy tuple-of-tuples cache
    return 0


class SparseEngine:
    """Reversible sparse patch of one model. Not re-entrant; one engine per model at a time.

    keep: one keep ratio for every sparse layer (CoreInfer) or one per sparse layer
    (levels). token_ratio: CoreInfer's per-token quota fraction. layers: "START:STOP",
    a LayerRange, a list of indices, or None for the default (LayerRange.default_for).
    mode: "masked" (dense compute, unkept neurons zeroed) or "sliced" (gathered weights).
    selector: which neurons a prompt keeps: "coreinfer" (votes, ``token_ratio``) or
    "griffin" (column norms of the token-normalized activations; no token ratio). The
    keep ratios say how many.
    """

    def __init__(
        self,
        model: nn.Module,
        keep: float | Sequence[float],
        *,
        token_ratio: float = 0.2,
        layers: LayerRange | str | Sequence[int] | None = None,
        mode: str = "masked",
        selector: str = "coreinfer",
    ):
        self.model = model
        self.adapter = adapter_for(model)
        decoder_layers = self.adapter.decoder_layers(model)
        self.layers = resolve_layers(layers, len(decoder_layers))
        self.keep = resolve_keep(keep, len(self.layers))
        self.token_ratio = check_token_ratio(token_ratio)
        self.mode = check_mode(mode)
        self.selector = check_selector(selector)
        self.num_neurons = self.adapter.intermediate_size(model)
        self.context: ForwardContext | None = None
        self.runtimes = [
            LayerRuntime(engine=self, layer=layer, slot=slot, keep=k)
            for slot, (layer, k) in enumerate(zip(self.layers, self.keep, strict=True))
        ]
        #: one (B, L) tensor of kept counts per prefill call
        self.records: list[torch.Tensor] = []
        self._prompt_lengths: torch.Tensor | None = None
        #: inside ``collecting()``: slot -> (votes, mass) of the last prefill
        self.collected: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        #: the current selection serves one scoring pass (``preselect``), not decode steps
        self.single_pass = False
        self._undo: list = []

    # -- patching ---------------------------------------------------------------
    def __enter__(self) -> SparseEngine:
        if self._undo:
            raise RuntimeError("SparseEngine is already active")
        decoder_layers = self.adapter.decoder_layers(self.model)
        try:
            for rt in self.runtimes:
                self._undo.append(self.adapter.patch_layer(decoder_layers[rt.layer], rt))
            handle = self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
            self._undo.append(handle.remove)
            handle = self.model.register_forward_hook(self._post_forward)
            self._undo.append(handle.remove)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.context = None
        for rt in self.runtimes:
            rt.selection, rt.sliced = None, {}

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside this block the model runs as loaded (e.g. to run prompts dense with
        ``engine.prompts.run_prompts``, which patches it itself); the patch is back after.
        Recorded kept counts survive; the current selection does not (the next call
        prefills, or ``preselect`` installs one)."""
        if not self._undo:
            raise RuntimeError("SparseEngine.paused() needs an active engine")
        self._restore()
        try:
            yield
        finally:
            self.__enter__()

    # -- continuation scoring ---------------------------------------------------
    @contextlib.contextmanager
    def scoring(self, prompt_lengths: Sequence[int] | torch.Tensor) -> Iterator[None]:
        """Inside this block, every prefill call treats positions ``>= prompt_lengths[b]``
        of row b as continuation tokens: selection uses only the positions before, and
        the continuation runs sparse (what log-likelihood scoring needs)."""
        previous = self._prompt_lengths
        self._prompt_lengths = torch.as_tensor(prompt_lengths, dtype=torch.long).flatten()
        try:
            yield
        finally:
            self._prompt_lengths = previous

    # -- prompts computed once ----------------------------------------------------
    @contextlib.contextmanager
    def collecting(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Inside this block, each prefill also keeps every sparse layer's selection
        statistics ``(votes, mass)`` (B, N) (``selection.selection_statistics`` for the
        engine's selector), even for
        layers that run dense. The yielded list holds them, in sparse-layer order,
        for the last prefill when the block ends."""
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.collected = {}
        try:
            yield out
        finally:
            collected, self.collected = self.collected, None
            out.extend(collected[slot] for slot in sorted(collected))

    def preselect(
        self,
        statistics: Sequence[tuple[torch.Tensor, torch.Tensor]],
        *,
        single_pass: bool = True,
    ) -> None:
        """Select core neurons from prompt statistics kept by ``collecting()`` (one
        ``(votes, mass)`` per sparse layer, for a batch of B prompts), as a prefill of
        those prompts would, and record the kept counts. The next forward calls, given
        the prompts' KV cache, are then decode steps of that batch: a fixed prompt's
        dense pass is computed once and reused under any keep ratios (same selector,
        token ratio and layers).

        single_pass: the selection serves one forward call (scoring a continuation), so
        sliced layers compute it masked: gathering the kept weights costs more than one
        pass saves. Give False when decode steps follow."""
        if len(statistics) != len(self.runtimes):
            raise ConfigError(
                f"statistics for {len(statistics)} layers, the engine has {len(self.runtimes)}"
            )
        self.context = None
        self.single_pass = single_pass
        if not statistics:
            return
        kept = torch.zeros(statistics[0][0].shape[0], len(self.runtimes), dtype=torch.long)
        for rt, (votes, mass) in zip(self.runtimes, statistics, strict=True):
            kept[:, rt.slot] = rt.install(votes, mass).kept.cpu()
        self.records.append(kept)

    # -- hooks ------------------------------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape = ids.shape if ids is not None else embeds.shape[:2]
        device = (ids if ids is not None else embeds).device
        bsz, length = int(shape[0]), int(shape[1])
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if _cache_length(cache) > 0:
            self.context = ForwardContext(bsz, length, prefill=False)
            return None

        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            prompt = mask[:, -length:].to(device=device, dtype=torch.bool)
        else:
            prompt = torch.ones(bsz, length, dtype=torch.bool, device=device)
        continuation = None
        if self._prompt_lengths is not None:
            lengths = self._prompt_lengths.to(device)
            if lengths.numel() != bsz:
                raise ConfigError(
                    f"{lengths.numel()} prompt lengths given for a batch of {bsz} rows"
                )
            before = torch.arange(length, device=device).unsqueeze(0) < lengths.unsqueeze(1)
            continuation = ~before
            prompt = prompt & before
        kept = torch.zeros(bsz, len(self.runtimes), dtype=torch.long)
        self.single_pass = False
        self.context = ForwardContext(bsz, length, True, prompt, continuation, kept)
        return None

    def _post_forward(self, module, args, output):
        ctx = self.context
        if ctx is not None and ctx.prefill:
            self.records.append(ctx.kept)
        return None

    # -- realized density -------------------------------------------------------
    def reset_records(self) -> None:
        self.records = []

    def kept_counts(self) -> torch.Tensor:
        """(sequences, sparse layers) kept counts of every prefill since the last reset."""
        if not self.records:
            return torch.zeros(0, len(self.runtimes), dtype=torch.long)
        return torch.cat(self.records)

    def sequence_density(self) -> torch.Tensor:
        """Realized density of every recorded sequence: kept / (N x sparse layers)."""
        counts = self.kept_counts().double()
        return counts.sum(dim=1) / (self.num_neurons * len(self.runtimes))

    def realized_density(self) -> float:
        """Mean realized density over the recorded sequences (nan if none)."""
        d = self.sequence_density()
        return float(d.mean()) if d.numel() else float("nan")

    def layer_density(self) -> list[float]:
        """Mean kept fraction per sparse layer over the recorded sequences."""
        counts = self.kept_counts().double()
        if not counts.shape[0]:
            return [float("nan")] * len(self.runtimes)
        return (counts.mean(dim=0) / self.num_neurons).tolist()
