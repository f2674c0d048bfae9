"""Which layers run sparse, and with which keep ratio: validated, frozen configuration."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autosparse.errors import ConfigError

#: The reference's range (CoreInfer ``start_num=5, end_num=27``, both exclusive).
REFERENCE_LAYERS = (6, 27)
MODES = ("masked", "sliced")
#: how a prompt's kept neurons are chosen: CoreInfer's votes or GRIFFIN's column norms
SELECTORS = ("coreinfer", "griffin")


@dataclass(frozen=True)
class LayerRange:
    """Half-open range ``start:stop`` of decoder layers that run sparse (Python slice rules)."""

    start: int
    stop: int

    @classmethod
    def parse(cls, text: str) -> LayerRange:
        """Parse ``"6:27"`` (start inclusive, stop exclusive)."""
        parts = str(text).split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            start, stop = int(parts[0]), int(parts[1])
        except ValueError:
            raise ConfigError(
                f"bad layer range {text!r}: write START:STOP, e.g. 6:27 for layers 6..26"
            ) from None
        return cls(start, stop)

    @classmethod
    def default_for(cls, num_layers: int) -> LayerRange:
        """The reference's 6:27 when the model has that many layers; otherwise every
        layer but the first and the last (all of them for models under 3 layers)."""
        if num_layers >= REFERENCE_LAYERS[1]:
            return cls(*REFERENCE_LAYERS)
        if num_layers >= 3:
            return cls(1, num_layers - 1)
        return cls(0, num_layers)

    def check(self, num_layers: int) -> range:
        if not (0 <= self.start < self.stop <= num_layers):
            raise ConfigError(
                f"bad layer range {self}: the model has {num_layers} layers, "
                f"so START:STOP needs 0 <= START < STOP <= {num_layers}"
            )
        return range(self.start, self.stop)

    def __str__(self) -> str:
        return f"{self.start}:{self.stop}"


def resolve_layers(layers: LayerRange | str | Sequence[int] | None, num_layers: int) -> list[int]:
    """Absolute indices of the sparse layers for a model with ``num_layers`` layers."""
    if layers is None:
        return list(LayerRange.default_for(num_layers).check(num_layers))
    if isinstance(layers, str):
        layers = LayerRange.parse(layers)
    if isinstance(layers, LayerRange):
        return list(layers.check(num_layers))
    if isinstance(layers, range):
        return list(LayerRange(layers.start, layers.stop).check(num_layers))
    out = [int(i) for i in layers]
    if not out or len(set(out)) != len(out) or min(out) < 0 or max(out) >= num_layers:
        raise ConfigError(f"bad layer list {out}: need distinct indices in 0..{num_layers - 1}")
    return out


def resolve_keep(keep: float | Sequence[float], num_sparse: int) -> tuple[float, ...]:
    """One keep ratio per sparse layer. A single number applies to every layer (CoreInfer);
    a vector (the levels method) must have one entry per sparse layer."""
    if isinstance(keep, (int, float)):
        values = (float(keep),) * num_sparse
    else:
        values = tuple(float(k) for k in keep)
        if len(values) != num_sparse:
            raise ConfigError(
                f"levels vector has {len(values)} entries but {num_sparse} layers run sparse; "
                "give one keep ratio per sparse layer or change --layers"
            )
    for k in values:
        if not (0.0 < k <= 1.0):
            raise ConfigError(f"keep ratio {k} is outside (0, 1]")
    return values


def check_token_ratio(token_ratio: float) -> float:
    if not (0.0 < token_ratio <= 1.0):
        raise ConfigError(f"token ratio {token_ratio} is outside (0, 1]")
    return float(token_ratio)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def check_selector(selector: str) -> str:
    if selector not in SELECTORS:
        raise ConfigError(f"unknown selector {selector!r}; choose one of {', '.join(SELECTORS)}")
    return selector


def layer_range_text(layers: Sequence[int]) -> str | None:
    """``"START:STOP"`` for contiguous layers (as ``--layers`` takes them), else None."""
    layers = list(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}:{layers[-1] + 1}"
    return None
