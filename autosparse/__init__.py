"""autosparse: per-layer keep ratios for activation-sparse LLM inference.

The package is a library first; ``autosparse.cli`` is a thin click layer on top.
Heavy dependencies (torch, transformers, lm_eval, optuna) are imported lazily
inside the modules that need them, so ``import autosparse`` stays cheap.
"""

__version__ = "0.1.0"
