"""Gated MLPs: ``y = down(act(gate(x)) * up(x))`` (Llama, Mistral, Qwen2/3, Gemma, ...)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from autosparse.adapters.base import FamilyAdapter, Restore, tensor_bytes
from autosparse.errors import UnsupportedModelError


class GatedMLPAdapter(FamilyAdapter):
    model_types: ClassVar[tuple[str, ...]] = (
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
    )
    kind = "gated"

    def decoder_layers(self, model):
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no .model.layers; is it a causal LM of a gated family?"
            )
        return layers

    def intermediate_size(self, model):
        return int(self.decoder_layers(model)[0].mlp.down_proj.in_features)

    def _check(self, mlp):
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(mlp, name):
                raise UnsupportedModelError(
                    f"{type(mlp).__name__} lacks {name}; not a gated MLP this adapter knows"
                )

    def patch_layer(self, layer, runtime) -> Restore:
        from autosparse.engine.modules import SparseGatedMLP

        original = layer.mlp
        self._check(original)
        layer.mlp = SparseGatedMLP(original, runtime)

        def restore() -> None:
            layer.mlp = original

        return restore

    def capture_activations(self, layer, callback: Callable) -> Callable[[], None]:
        self._check(layer.mlp)

        def hook(module, args):
            callback(args[0])

        handle = layer.mlp.down_proj.register_forward_pre_hook(hook)
        return handle.remove

    def ffn_neuron_bytes(self, layer) -> tuple[int, int]:
        mlp = layer.mlp
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        per_neuron = sum(tensor_bytes(t) for t in (gate.weight, gate.bias, up.weight, up.bias))
        return per_neuron + tensor_bytes(down.weight), tensor_bytes(down.bias)
