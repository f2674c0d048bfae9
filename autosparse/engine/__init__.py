"""The sparse-inference engine: selection math, sparse FFN modules, reversible patching."""

from autosparse.engine.config import LayerRange, resolve_keep, resolve_layers
from autosparse.engine.patch import SparseEngine
from autosparse.engine.selection import Selection, keep_count, select_core_neurons

__all__ = [
    "LayerRange",
    "Selection",
    "SparseEngine",
    "keep_count",
    "resolve_keep",
    "resolve_layers",
    "select_core_neurons",
]
