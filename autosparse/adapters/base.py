"""The adapter interface shared by all model families."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import nn

    from autosparse.engine.runtime import LayerRuntime

Restore = Callable[[], None]


def tensor_bytes(t: torch.Tensor | None) -> int:
    """Bytes of a tensor's elements (0 for None, e.g. a missing bias)."""
    return 0 if t is None else t.numel() * t.element_size()


class FamilyAdapter:
    """Where the FFN neurons of one model family live, and how to patch them.

    ``activation`` of a neuron is the quantity selection ranks: for gated MLPs
    the input of ``down_proj`` (``act(gate) * up``), for OPT the ``fc1`` output
    before the ReLU (see docs/method.md).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    #: "gated" or "relu": documentation and reporting only
    kind: ClassVar[str] = ""

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def num_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))

    def intermediate_size(self, model: nn.Module) -> int:
        raise NotImplementedError

    def patch_layer(self, layer: nn.Module, runtime: LayerRuntime) -> Restore:
        """Install the sparse FFN for one decoder layer; return a function that undoes it."""
        raise NotImplementedError

    def capture_activations(
        self, layer: nn.Module, callback: Callable[[torch.Tensor], None]
    ) -> Callable[[], None]:
        """Call ``callback(act)`` with the layer's FFN activations (``(..., N)``) on every
        forward pass, without changing the computation. Returns a remover."""
        raise NotImplementedError

    def ffn_neuron_bytes(self, layer: nn.Module) -> tuple[int, int]:
        """Bytes of one layer's FFN parameters as ``(per_neuron, shared)``: ``per_neuron``
        is what belongs to single neurons (their weight rows or columns and biases), of
        which a sparse layer reads only the kept neurons' part; ``shared`` is what every
        token reads whole (the output bias). For ideal-speedup estimates."""
        raise NotImplementedError

    def ffn_weight_bytes(self, layer: nn.Module) -> int:
        """Bytes of the FFN weights of one layer (for ideal-speedup estimates)."""
        return sum(self.ffn_neuron_bytes(layer))
