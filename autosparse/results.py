"""What evaluations produce and the result store keeps: the result of one method on one
task sample, and the dense model's reference continuation of one prompt (the fidelity
objective's)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


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


@dataclass(frozen=True, eq=False)
class Reference:
    """The dense model's greedy continuation of one document's prompt.

    ``prompt_ids`` and ``continuation`` are token ids (the continuation ends at the
    first end-of-sequence token, inclusive, or after ``max_new_tokens``).
    ``top_ids`` (C, k) int64 and ``top_logprobs`` (C, k) float32 are the dense
    model's k most likely next tokens and their log-probabilities at each
    continuation position, from a teacher-forced dense pass. ``dense_fidelity`` is
    the dense model's mean log-likelihood of the continuation (same pass).
    ``prompt_sha`` is the SHA-256 of the prompt text, to notice changed task data."""

    doc_id: int
    prompt_sha: str
    prompt_ids: tuple[int, ...]
    continuation: tuple[int, ...]
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    dense_fidelity: float


def package_versions(
    names: tuple[str, ...] = ("autosparse", "torch", "transformers", "lm_eval"),
) -> dict[str, str]:
    """The installed versions of ``names`` (from package metadata, so nothing is imported);
    a package that is not installed is left out."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
