"""lm-eval's SQuAD v2 task with the local scorer (no ``evaluate.load``), and a dataset
that a task config may override (``dataset_path`` / ``dataset_kwargs``), so fixtures
in the squad_v2 schema can stand in for the real data offline."""

from __future__ import annotations

from functools import partial
from typing import Any

from lm_eval.tasks.squadv2.task import SQuAD2

from autosparse.tasks.metrics import squad_v2_compute

_PASSED = (
    "task",
    "dataset_path",
    "dataset_name",
    "dataset_kwargs",
    "generation_kwargs",
    "metadata",
)


def _aggregate(key: str, items: list[tuple[dict, dict]]) -> float:
    predictions, references = zip(*items, strict=True)
    return squad_v2_compute(predictions, references).get(key, 0.0)


class LocalSQuAD2(SQuAD2):
    """Same prompts and requests as lm-eval's ``squadv2`` (a greedy answer plus the
    log-likelihood of " unanswerable"); scored by :func:`squad_v2_compute`."""

    def __init__(self, config: dict[str, Any] | None = None):
        cfg = {k: v for k, v in (config or {}).items() if k in _PASSED}
        cfg["metadata"] = {"version": self.VERSION, **(cfg.get("metadata") or {})}
        # skip SQuAD2.__init__, which throws the config away
        super(SQuAD2, self).__init__(config=cfg)

    def construct_requests(self, doc, ctx, **kwargs):
        requests = super().construct_requests(doc, ctx, **kwargs)
        extra = self.config.generation_kwargs or {}
        if extra:  # e.g. max_gen_toks; the stop sequence stays lm-eval's "\n"
            for req in requests:
                if req.request_type == "generate_until":
                    context, gen = req.arguments
                    req.arguments = (context, {**extra, **gen})
        return requests

    def aggregation(self) -> dict[str, Any]:
        return {key: partial(_aggregate, key) for key in super().aggregation()}
