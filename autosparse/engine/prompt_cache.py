"""Kept prompts: batches of prompts run once (``engine.prompts.run_prompts``), reused by
every later method that selects with the same token ratio and layers, within a memory
budget.

A screening study scores the same documents under many keep ratios; their prompts run
dense, so one run per batch serves every trial. The batches hold KV caches on the
model's device, hence the budget: least recently used batches are dropped first, and
the batch in use is always kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autosparse.engine.prompts import PromptBatch


class PromptCache:
    """``PromptBatch``es by key (e.g. documents, token ratio, layers), at most ``budget``
    bytes of them (``PromptBatch.nbytes``) besides the most recent one. A budget of 0
    keeps nothing: callers then run prompts together with their continuations."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, int(budget_bytes))
        self._batches: OrderedDict[Hashable, PromptBatch] = OrderedDict()
        #: how many batches were run (cache misses)
        self.runs = 0

    @classmethod
    def of_gib(cls, gib: float) -> PromptCache:
        return cls(int(max(0.0, float(gib)) * 2**30))

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def __len__(self) -> int:
        return len(self._batches)

    def get(self, key: Hashable, run: Callable[[], PromptBatch]) -> PromptBatch:
        """The batch kept under ``key``, or ``run()``'s, kept (dropping the least recently
        used batches while the total exceeds the budget)."""
        batch = self._batches.get(key)
        if batch is None:
            batch = run()
            self.runs += 1
            self._batches[key] = batch
            total = sum(b.nbytes for b in self._batches.values())
            for old in list(self._batches)[:-1]:  # least recently used first
                if total <= self.budget_bytes:
                    break
                total -= self._batches.pop(old).nbytes
        self._batches.move_to_end(key)
        return batch
