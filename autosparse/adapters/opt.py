"""OPT: ``a = fc1(x)``, ``h = relu(a)``, ``y = fc2(h)``; ``fc2``'s bias always stays whole."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from autosparse.adapters.base import FamilyAdapter, Restore, tensor_bytes
from autosparse.errors import UnsupportedModelError


class OPTAdapter(FamilyAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("opt",)
    kind = "relu"

    def decoder_layers(self, model):
        decoder = getattr(getattr(model, "model", None), "decoder", None)
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no .model.decoder.layers")
        return layers

    def intermediate_size(self, model):
        return int(self.decoder_layers(model)[0].fc1.out_features)

    def patch_layer(self, layer, runtime) -> Restore:
        import torch.nn.functional as F

        from autosparse.engine.modules import SparseOPTFc1, SparseOPTFc2

        fc1, fc2 = layer.fc1, layer.fc2
        # OPT's layer flattens tokens to (B*T, D) around the FFN; the runtime knows B and T.
        # (the ReLU between them makes fc2's input, which GRIFFIN's selection ranks)
        layer.fc1 = SparseOPTFc1(fc1, runtime, getattr(layer, "activation_fn", F.relu))
        layer.fc2 = SparseOPTFc2(fc2, runtime)

        def restore() -> None:
            layer.fc1, layer.fc2 = fc1, fc2

        return restore

    def capture_activations(self, layer, callback: Callable) -> Callable[[], None]:
        def hook(module, args, output):
            callback(output)

        handle = layer.fc1.register_forward_hook(hook)
        return handle.remove

    def ffn_neuron_bytes(self, layer) -> tuple[int, int]:
        fc1, fc2 = layer.fc1, layer.fc2
        per_neuron = tensor_bytes(fc1.weight) + tensor_bytes(fc1.bias) + tensor_bytes(fc2.weight)
        return per_neuron, tensor_bytes(fc2.bias)
