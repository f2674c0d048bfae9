"""Task evaluation through lm-eval, with sparsity applied where lm-eval scores.

- ``evaluate(model, task, method, ...) -> EvalResult`` (``run_task`` also returns the
  per-document realized density and lm-eval's raw output);
- ``sample_ids(task, limit, seed)``: the seeded document sample ``--limit`` scores;
- ``calibration_texts(task, n, exclude_ids=..., seed=..., with_answers=...)``:
  prompts for calibration drawn apart from an evaluation sample;
- ``TASKS`` / ``ALIASES``: the reference and local tasks and their primary metrics.

lm_eval and torch are imported only when one of the functions runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autosparse.tasks.registry import ALIASES, DEFAULT_FEWSHOT, DEFAULT_SEED, TASKS, TaskSpec

if TYPE_CHECKING:
    from autosparse.tasks.evaluation import TaskRun

__all__ = [
    "ALIASES",
    "DEFAULT_FEWSHOT",
    "DEFAULT_SEED",
    "TASKS",
    "TaskRun",
    "TaskSpec",
    "calibration_texts",
    "evaluate",
    "run_task",
    "sample_ids",
]

_LAZY = {
    "evaluate": "autosparse.tasks.evaluation",
    "run_task": "autosparse.tasks.evaluation",
    "TaskRun": "autosparse.tasks.evaluation",
    "eval_settings": "autosparse.tasks.evaluation",
    "sample_ids": "autosparse.tasks.sampling",
    "calibration_texts": "autosparse.tasks.sampling",
    "draw_sample": "autosparse.tasks.sampling",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autosparse.tasks' has no attribute {name!r}")
