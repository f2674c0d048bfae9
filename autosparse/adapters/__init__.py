"""Model-family adapters: the one place that knows where a family's FFN neurons are.

An adapter is chosen by the transformers ``config.model_type``; no module names
are parsed. Add a family by writing an adapter and registering it in ``ADAPTERS``.
"""

from __future__ import annotations

from autosparse.adapters.base import FamilyAdapter
from autosparse.adapters.gated import GatedMLPAdapter
from autosparse.adapters.opt import OPTAdapter
from autosparse.errors import UnsupportedModelError

_GATED = GatedMLPAdapter()
_OPT = OPTAdapter()

#: transformers ``model_type`` -> adapter
ADAPTERS: dict[str, FamilyAdapter] = {
    **{t: _GATED for t in GatedMLPAdapter.model_types},
    **{t: _OPT for t in OPTAdapter.model_types},
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model) -> FamilyAdapter:
    """Return the adapter for a loaded Hugging Face causal LM, or raise UnsupportedModelError."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported families: "
            + ", ".join(supported_model_types())
        )
    return adapter


__all__ = ["ADAPTERS", "FamilyAdapter", "adapter_for", "supported_model_types"]
