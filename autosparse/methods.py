"""A sparsity method as a value: dense, CoreInfer (one keep ratio), or levels (one per layer)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from autosparse.errors import ConfigError

METHODS = ("dense", "coreinfer", "levels")
#: how each prompt's kept neurons are chosen (engine.config.SELECTORS), as reports name them
SELECTOR_NAMES = {"coreinfer": "CoreInfer", "griffin": "GRIFFIN"}
DEFAULT_SELECTOR = "coreinfer"


def uniform_label(keep: float, selector: str = DEFAULT_SELECTOR) -> str:
    """How reports name one keep ratio for every sparse layer: "CoreInfer keep=0.4",
    "GRIFFIN keep=0.4"."""
    return f"{SELECTOR_NAMES[selector]} keep={keep:g}"


@dataclass(frozen=True)
class Method:
    """What runs sparse and how. ``keep`` is a float for coreinfer and a tuple (one entry
    per sparse layer) for levels; it is None for dense. ``layers`` is "START:STOP" or None
    for the model's default range. ``selector`` chooses which neurons a prompt keeps
    (``keep`` says how many): "coreinfer" (votes) or "griffin" (column norms; it has no
    token ratio, so ``token_ratio`` is not part of a griffin method's identity).
    ``params`` carries descriptive metadata only (for levels: w_sum, w_count, threshold,
    top_k, ...); it does not change the computation."""

    name: str
    keep: float | tuple[float, ...] | None = None
    token_ratio: float = 0.2
    layers: str | None = None
    mode: str = "masked"
    selector: str = DEFAULT_SELECTOR
    params: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")
        if self.selector not in SELECTOR_NAMES:
            raise ConfigError(
                f"unknown selector {self.selector!r}; choose one of {', '.join(SELECTOR_NAMES)}"
            )
        if self.name == "dense":
            if self.selector != DEFAULT_SELECTOR:
                raise ConfigError("the dense method keeps every neuron; it takes no selector")
            return
        if self.keep is None:
            raise ConfigError(f"method {self.name} needs a keep ratio (or a levels vector)")
        if self.name == "levels" and isinstance(self.keep, (int, float)):
            raise ConfigError("method levels needs a vector of per-layer keep ratios")
        if isinstance(self.keep, (list, tuple)):
            object.__setattr__(self, "keep", tuple(float(k) for k in self.keep))
        keeps = self.keep if isinstance(self.keep, tuple) else (self.keep,)
        for k in keeps:
            if not (0.0 < float(k) <= 1.0):
                raise ConfigError(f"keep ratio {k} is outside (0, 1]")

    @classmethod
    def dense(cls) -> Method:
        return cls("dense")

    @classmethod
    def coreinfer(cls, keep: float, token_ratio: float = 0.2, **kw: Any) -> Method:
        return cls("coreinfer", float(keep), token_ratio, **kw)

    @classmethod
    def levels(cls, levels: Sequence[float], token_ratio: float = 0.2, **kw: Any) -> Method:
        return cls("levels", tuple(float(x) for x in levels), token_ratio, **kw)

    @property
    def mean_keep(self) -> float:
        """Planned mean keep ratio over the sparse layers (1.0 for dense)."""
        if self.keep is None:
            return 1.0
        if isinstance(self.keep, tuple):
            return sum(self.keep) / len(self.keep)
        return float(self.keep)

    def label(self) -> str:
        if self.name == "dense":
            return "dense"
        if self.selector == "griffin":
            if self.name == "coreinfer":
                return uniform_label(self.keep, self.selector)
            return f"levels mean={self.mean_keep:.3f} GRIFFIN"
        if self.name == "coreinfer":
            return f"coreinfer keep={self.keep:g} q={self.token_ratio:g}"
        return f"levels mean={self.mean_keep:.3f} q={self.token_ratio:g}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able identity of the method (what a stored result is keyed by). The
        default selector adds no entry, so results stored before selectors existed keep
        their keys."""
        griffin = self.selector == "griffin"
        out = {
            "name": self.name,
            "keep": list(self.keep) if isinstance(self.keep, tuple) else self.keep,
            "token_ratio": None if self.name == "dense" or griffin else self.token_ratio,
            "layers": self.layers,
            "mode": None if self.name == "dense" else self.mode,
        }
        if self.selector != DEFAULT_SELECTOR:
            out["selector"] = self.selector
        return out

    @contextlib.contextmanager
    def apply(self, model) -> Iterator[Any]:
        """Patch ``model`` for this method; yields the SparseEngine (None for dense)."""
        if self.name == "dense":
            yield None
            return
        from autosparse.engine import SparseEngine

        with SparseEngine(
            model,
            self.keep,
            token_ratio=self.token_ratio,
            layers=self.layers,
            mode=self.mode,
            selector=self.selector,
        ) as engine:
            yield engine
