"""Seeded document samples and calibration prompts drawn apart from them."""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import Any

from autosparse.errors import TaskError


def draw_sample(n_docs: int, limit: int | None, seed: int) -> list[int]:
    """``limit`` document ids out of ``range(n_docs)``, drawn at random with ``seed`` and
    returned sorted (all ids when ``limit`` is None or not smaller than ``n_docs``).
    The draw depends only on (n_docs, limit, seed): every method gets the same sample."""
    if limit is not None and limit < 1:
        raise TaskError(f"limit must be at least 1, not {limit}")
    if limit is None or limit >= n_docs:
        return list(range(n_docs))
    return sorted(random.Random(seed).sample(range(n_docs), limit))


def sample_ids(task: str, limit: int | None, seed: int = 42, *, include_path=None) -> list[int]:
    """The document ids ``evaluate(..., limit=limit, seed=seed)`` scores on ``task``."""
    from autosparse.tasks.registry import load_task

    _, task_obj = load_task(task, include_path)
    return draw_sample(len(task_obj.eval_docs), limit, seed)


def _answer_text(task_obj: Any, doc: dict) -> str:
    target = task_obj.doc_to_target(doc)
    if task_obj.OUTPUT_TYPE == "multiple_choice":
        choices = task_obj.doc_to_choice(doc)
        if isinstance(target, str) and target in choices:
            target = choices.index(target)
        if isinstance(target, list):
            target = target[0]
        return str(choices[int(target)])
    if isinstance(target, list):
        target = target[0] if target else ""
    return str(target)


def prompt_text(task_obj: Any, doc: dict, with_answer: bool = False) -> str:
    """The zero-shot prompt of ``doc`` as the task presents it, optionally followed by
    the task's target delimiter and the gold answer."""
    text = task_obj.doc_to_text(doc)
    if not isinstance(text, str):  # a task whose doc_to_text picks a choice index
        text = str(task_obj.doc_to_choice(doc)[text])
    if not with_answer:
        return text
    delimiter = task_obj.config.target_delimiter if task_obj.config.target_delimiter else " "
    return text + delimiter + _answer_text(task_obj, doc).strip()


def calibration_texts(
    task: str,
    n: int,
    *,
    exclude_ids: Collection[int] = (),
    seed: int = 0,
    with_answers: bool = False,
    include_path=None,
) -> list[tuple[int, str]]:
    """``n`` (doc id, zero-shot prompt) pairs from the task's evaluation split, drawn at
    random with ``seed`` among the documents whose id is not in ``exclude_ids`` (pass
    the evaluation sample to keep calibration and evaluation apart). Ids are positions
    in the evaluation split, as in ``sample_ids``; sorted by id. Fewer than ``n`` pairs
    come back when fewer documents remain. ``with_answers`` appends the gold answer
    (the first one, for tasks with several) after the task's target delimiter."""
    from autosparse.tasks.registry import load_task

    if n < 1:
        raise TaskError(f"need at least one calibration prompt, not {n}")
    _, task_obj = load_task(task, include_path)
    docs = task_obj.eval_docs
    excluded = set(int(i) for i in exclude_ids)
    candidates = [i for i in range(len(docs)) if i not in excluded]
    chosen = sorted(random.Random(seed).sample(candidates, min(n, len(candidates))))
    return [(i, prompt_text(task_obj, docs[i], with_answers)) for i in chosen]
