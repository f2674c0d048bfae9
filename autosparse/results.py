"""The result of evaluating one method on one task sample: what the store keeps."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class EvalResult:
    """One evaluation. ``sample_scores[i]`` is the primary metric of document
    ``sample_ids[i]`` (paired comparisons match on ids). ``density`` is the realized
    kept fraction averaged over sequences (None for dense); ``layer_density`` is the
    mean kept fraction per sparse layer."""

    model: str
    task: str
    method: dict[str, Any]
    metric: str
    score: float
    metrics: dict[str, float] = field(default_factory=dict)
    sample_ids: list[int] = field(default_factory=list)
    sample_scores: list[float] = field(default_factory=list)
    density: float | None = None
    layer_density: list[float] | None = None
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)  # limit, seed, shots, batch size
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        return cls(**d)
