"""Levels for a model from its calibration statistics, the library side of
``autosparse levels``: choose the calibration prompts, read or compute their statistics
(loading the model only when they are not cached), solve the setting, and write the
levels file or a plot of it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autosparse.calibration import DEFAULT_DIR, DEFAULT_MAX_TOKENS, CalibrationChoice
from autosparse.errors import ConfigError

if TYPE_CHECKING:
    from autosparse.levels import LevelsResult
    from autosparse.models import LoadedModel


@dataclass(frozen=True)
class LevelsOutcome:
    """Levels solved from calibration statistics. ``calibration`` records where the
    prompts came from (source and how they were chosen), their count, their ids and
    whether the statistics were ``reused`` from the cache."""

    model_id: str
    result: LevelsResult
    calibration: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The levels, the setting and the calibration as one JSON-able object."""
        result = self.result
        return {
            "model": self.model_id,
            "layers": result.layer_range,
            "levels": list(result.levels),
            "mean": result.mean,
            "goal": result.goal,
            "params": result.params,
            "calibration": self.calibration,
        }

    def write(self, path: str | os.PathLike) -> Path:
        """Write the levels file. Raises ConfigError, writing nothing, when a layer's
        level is 0 (the engine cannot run a layer that keeps no neuron)."""
        from autosparse.levels import write_levels_file

        result = self.result
        zero = [layer for layer, x in zip(result.layers, result.levels, strict=True) if x <= 0]
        if zero:
            raise ConfigError(
                f"layer(s) {', '.join(map(str, zero))} get level 0.00 (no neuron kept), which "
                "the engine cannot run; lower --threshold, raise --goal, or change --layers"
            )
        return write_levels_file(
            path, result, model=self.model_id, extra={"calibration": self.calibration}
        )


def run_levels(
    model: str,
    calibration: CalibrationChoice,
    *,
    threshold: float | None = None,
    goal: float | None = None,
    w_sum: float = 0.45,
    w_count: float | None = None,
    top_k: int = 100,
    layers: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 8,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    cache_dir: str | os.PathLike = DEFAULT_DIR,
    loader: Callable[[str, str, str], LoadedModel] | None = None,
    progress: bool = True,
) -> LevelsOutcome:
    """Levels of ``model``'s sparse ``layers`` for one setting: give ``threshold``, or
    ``goal`` (a mean keep ratio in (0, 1]) to solve for the threshold. ``w_count``
    defaults to 1 - ``w_sum``. Statistics are read from ``cache_dir`` or computed there;
    only then is the model loaded, with ``loader(model, device, dtype)`` (default
    ``autosparse.models.load_model``). Settings are checked before anything is loaded."""
    from autosparse.calibration import calibration_stats, choose_calibration
    from autosparse.levels import LevelsIndex, check_setting
    from autosparse.models import model_identity

    if (threshold is None) == (goal is None):
        raise ConfigError("give exactly one of --threshold X or --goal G")
    if w_count is None:
        w_count = round(1.0 - w_sum, 10)
    check_setting(w_sum, w_count, 0.0 if threshold is None else threshold, top_k)
    if goal is not None and not (0.0 < goal <= 1.0):
        raise ConfigError(f"--goal {goal} is not a mean keep ratio in (0, 1]")

    prompts = choose_calibration(calibration)
    model_id = model_identity(model)

    def load_model():
        from autosparse.models import load_model as plain

        loaded = (loader or plain)(model, device, dtype)
        return loaded.model, loaded.tokenizer

    stats, reused = calibration_stats(
        prompts,
        model_id=model_id,
        load_model=load_model,
        dtype=dtype,
        device=device,
        directory=cache_dir,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
    )
    index = LevelsIndex.from_stats(stats, layers)
    if goal is not None:
        result = index.solve_goal(goal, w_sum, w_count, top_k)
    else:
        result = index.evaluate(w_sum, w_count, threshold, top_k)
    record = {
        "source": prompts.source,
        **prompts.how,
        "prompts": stats.num_prompts,
        "sample_ids": list(stats.sample_ids),
        "reused": reused,
    }
    return LevelsOutcome(model_id=model_id, result=result, calibration=record)


def plot_levels(path: str | os.PathLike, outcome: LevelsOutcome) -> None:
    """Write a PNG of level against layer, with the mean as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    result = outcome.result
    fig, ax = plt.subplots(figsize=(8, 4))
    try:
        ax.plot(result.layers, result.levels, marker="o")
        ax.axhline(result.mean, linestyle="--", color="gray", label=f"mean {result.mean:.3f}")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("kept fraction (CoreInfer 'sparsity')")
        ax.set_ylim(0, 1.05)
        params = ", ".join(f"{k}={v:g}" for k, v in result.params.items())
        ax.set_title(f"{outcome.model_id}\n{params}", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def plot_level_vectors(
    path: str | os.PathLike,
    series: dict[str, list[float]],
    *,
    uniform: float | None = None,
    uniform_label: str = "uniform",
    title: str = "",
) -> Path:
    """Write a PNG of several level vectors against the sparse layer's position, with a
    uniform keep ratio as a dashed line: how tuned allocations differ from a uniform one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not series:
        raise ConfigError("no level vectors to plot")
    fig, ax = plt.subplots(figsize=(8, 4))
    try:
        for label, levels in series.items():
            mean = sum(levels) / len(levels)
            ax.plot(
                range(len(levels)), levels, marker="o", ms=3, label=f"{label} (mean {mean:.3f})"
            )
        if uniform is not None:
            ax.axhline(uniform, linestyle="--", color="gray", label=f"{uniform_label} {uniform:g}")
        ax.set_xlabel("sparse layer (position)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("keep ratio")
        ax.set_ylim(0, 1.05)
        if title:
            ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)
