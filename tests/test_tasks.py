"""Task evaluation end to end through lm-eval on tiny models and hand-written fixtures.

The fixture tasks ``include:`` lm-eval's own configs of the reference tasks (triviaqa,
wmt16-de-en, commonsense_qa) and the local SQuAD v2 task, with ``data_files`` pointing
at tests/fixtures/tasks: lm-eval's prompts and metrics, offline data.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import tiny_llama, tiny_tokenizer

from autosparse.methods import Method

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
MAX_LEN = 1024  # the tiny tokenizer spends one token per character
GEN = {"max_gen_toks": 6}


def _task_yaml(name: str, body: dict) -> str:
    import yaml

    return yaml.safe_dump({"task": name, **body}, sort_keys=False)


def write_fx_csqa(folder) -> None:
    """fx-csqa.yaml in ``folder``: lm-eval's commonsense_qa config on the 6-row fixture file."""
    import lm_eval.tasks

    builtin = Path(lm_eval.tasks.__file__).parent
    data = str(FIXTURES / "commonsense_qa.jsonl")
    body = {
        "include": str(builtin / "commonsense_qa" / "default.yaml"),
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {s: data for s in ("train", "validation")}},
    }
    (Path(folder) / "fx-csqa.yaml").write_text(_task_yaml("fx-csqa", body))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    import lm_eval.tasks

    builtin = Path(lm_eval.tasks.__file__).parent
    out = tmp_path_factory.mktemp("tasks")

    def files(path: str, *splits: str) -> dict:
        return {"data_files": {s: str(FIXTURES / path) for s in splits}}

    specs = {
        "fx-triviaqa": {
            "include": str(builtin / "triviaqa" / "default.yaml"),
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": files("triviaqa.jsonl", "train", "validation"),
            "generation_kwargs": {
                "until": ["\n", ".", ","],
                "do_sample": False,
                "temperature": 0.0,
                **GEN,
            },
        },
        "fx-wmt16": {
            "include": str(builtin / "translation" / "wmt16_de-en.yaml"),
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": files("wmt16.jsonl", "train", "validation", "test"),
            "generation_kwargs": {"until": ["\n"], "do_sample": False, "temperature": 0.0, **GEN},
        },
        "fx-csqa": {
            "include": str(builtin / "commonsense_qa" / "default.yaml"),
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": files("commonsense_qa.jsonl", "train", "validation"),
        },
    }
    for name, body in specs.items():
        (out / f"{name}.yaml").write_text(_task_yaml(name, body))
    squad = _task_yaml(
        "fx-squadv2",
        {
            "dataset_path": "json",
            "dataset_kwargs": files("squad_v2.jsonl", "train", "validation"),
            "generation_kwargs": GEN,
        },
    )
    (out / "fx-squadv2.yaml").write_text(
        squad + "class: !function autosparse.tasks.squad.LocalSQuAD2\n"
    )
    return out


@pytest.fixture(scope="module")
def llama_pair():
    return tiny_llama(), tiny_tokenizer()


def run(pair, task, method, task_dir, **kw):
    from autosparse.tasks import run_task

    kw.setdefault("num_fewshot", 1)
    kw.setdefault("progress", False)
    return run_task(pair, task, method, include_path=task_dir, max_length=MAX_LEN, **kw)


CORE = Method.coreinfer(0.3)


# -- samples ------------------------------------------------------------------------


def test_sample_is_seeded_random_and_stable():
    from autosparse.tasks import draw_sample

    a = draw_sample(1000, 50, 42)
    assert a == draw_sample(1000, 50, 42)
    assert a == sorted(set(a)) and len(a) == 50
    assert a != list(range(50))
    assert draw_sample(1000, 50, 43) != a
    assert draw_sample(10, 50, 42) == list(range(10))
    assert draw_sample(10, None, 42) == list(range(10))


def test_sample_ids_of_a_real_task():
    from autosparse.tasks import sample_ids

    ids = sample_ids("csqa-local", 20, 42)
    assert ids == sample_ids("csqa-local", 20, 42)
    assert ids != list(range(20)) and max(ids) < 1221


# -- every task type end to end ------------------------------------------------------


def test_generation_exact_match(llama_pair, task_dir):
    dense = run(llama_pair, "fx-triviaqa", Method.dense(), task_dir, limit=3)
    r = dense.result
    assert r.task == "fx-triviaqa" and r.metric == "exact_match"
    assert len(r.sample_ids) == 3 and r.sample_ids != [0, 1, 2]
    assert all(s in (0.0, 1.0) for s in r.sample_scores)
    assert r.score == pytest.approx(sum(r.sample_scores) / 3)
    assert r.density is None and dense.sample_density == [None] * 3
    assert set(r.versions) >= {"torch", "transformers", "lm_eval"}
    assert r.settings["seed"] == 42 and r.settings["limit"] == 3

    sparse = run(llama_pair, "fx-triviaqa", CORE, task_dir, limit=3)
    assert sparse.result.sample_ids == r.sample_ids  # paired
    assert 0 < sparse.result.density <= 0.3
    assert all(0 < d <= 0.3 for d in sparse.sample_density)
    assert len(sparse.result.layer_density) == 2  # tiny llama: layers 1..2 sparse


def test_generation_bleu(llama_pair, task_dir):
    r = run(llama_pair, "fx-wmt16", CORE, task_dir, limit=4).result
    assert r.metric == "bleu" and math.isfinite(r.score)
    assert {"bleu", "chrf", "ter"} <= set(r.metrics)
    assert len(r.sample_scores) == 4 and all(math.isfinite(s) for s in r.sample_scores)


def test_multiple_choice(llama_pair, task_dir):
    run_ = run(llama_pair, "fx-csqa", CORE, task_dir)
    r = run_.result
    assert r.metric == "acc" and len(r.sample_ids) == 6  # no limit: every document
    assert r.score == pytest.approx(sum(r.sample_scores) / 6)
    assert all(d is not None and 0 < d <= 0.3 for d in run_.sample_density)


def test_squadv2_with_unanswerable_questions_scores_locally(llama_pair, task_dir, monkeypatch):
    import evaluate as hf_evaluate

    def offline(*a, **k):
        raise AssertionError("evaluate.load must not be called")

    monkeypatch.setattr(hf_evaluate, "load", offline)
    run_ = run(llama_pair, "fx-squadv2", CORE, task_dir, num_fewshot=0, metric="exact")
    r = run_.result
    assert r.metric == "exact" and 0.0 <= r.score <= 100.0
    assert {"f1", "HasAns_exact", "NoAns_exact", "best_exact"} <= set(r.metrics)
    assert r.score == pytest.approx(sum(r.sample_scores) / len(r.sample_scores))


def test_unknown_task_and_metric_are_task_errors(llama_pair, task_dir):
    from autosparse.errors import TaskError

    with pytest.raises(TaskError, match="no metric"):
        run(llama_pair, "fx-csqa", Method.dense(), task_dir, limit=2, metric="bleu")


# -- sparsity where lm-eval scores ---------------------------------------------------


def _loglikelihoods(pair, method, requests, batch_size=1):
    from autosparse.tasks.lm import SparseLM

    model, tok = pair
    lm = SparseLM(model, tok, batch_size=batch_size, max_length=MAX_LEN)
    with lm.sparse(method):
        out = lm._loglikelihood_tokens(requests)
        return [ll for ll, _ in out], lm.realized_density()


def _requests(tok, pairs):
    return [((c, a), tok.encode(c), tok.encode(a)) for c, a in pairs]


PAIRS = [
    ("Question: where do fish live?\nAnswer:", " in the water"),
    ("Question: where do fish live?\nAnswer:", " in a desert"),
    ("The capital of France is", " Paris, of course"),
    ("Two plus two makes", " four"),
]


def test_loglikelihoods_change_with_sparsity_and_keep_one_is_dense(llama_pair):
    reqs = _requests(llama_pair[1], PAIRS)
    dense, d_density = _loglikelihoods(llama_pair, Method.dense(), reqs)
    full, f_density = _loglikelihoods(llama_pair, Method.coreinfer(1.0), reqs)
    sparse, s_density = _loglikelihoods(llama_pair, Method.coreinfer(0.3), reqs)
    assert full == dense  # exactly
    assert d_density is None and f_density == 1.0 and 0 < s_density <= 0.3
    assert all(abs(a - b) > 1e-6 for a, b in zip(dense, sparse, strict=True))


def test_one_token_answer_is_scored_by_the_dense_prompt(llama_pair):
    reqs = _requests(llama_pair[1], [("Two plus two makes", " ")])
    dense, _ = _loglikelihoods(llama_pair, Method.dense(), reqs)
    sparse, _ = _loglikelihoods(llama_pair, Method.coreinfer(0.3), reqs)
    assert dense == pytest.approx(sparse, abs=1e-6)


def test_scoring_equals_prefill_then_sparse_decode(llama_pair):
    """Independent of engine.scoring: prefill the context, then feed the answer one token
    at a time through the KV cache (decode runs sparse), summing log P of each token."""
    import torch

    from autosparse.engine import SparseEngine

    model, tok = llama_pair
    reqs = _requests(tok, PAIRS)
    scored, _ = _loglikelihoods(llama_pair, CORE, reqs, batch_size=3)
    for (_, ctx, cont), want in zip(reqs, scored, strict=True):
        with SparseEngine(model, 0.3) as _engine, torch.no_grad():
            out = model(torch.tensor([ctx]), use_cache=True)
            cache, logits, total = out.past_key_values, out.logits[0, -1], 0.0
            for token in cont:
                total += float(torch.log_softmax(logits.double(), -1)[token])
                out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                cache, logits = out.past_key_values, out.logits[0, -1]
        assert total == pytest.approx(want, abs=1e-4)


def test_batched_equals_unbatched(llama_pair, task_dir):
    reqs = _requests(llama_pair[1], PAIRS)
    one, d1 = _loglikelihoods(llama_pair, CORE, reqs, batch_size=1)
    many, d4 = _loglikelihoods(llama_pair, CORE, reqs, batch_size=4)
    assert many == pytest.approx(one, abs=1e-4) and d4 == pytest.approx(d1)

    a = run(llama_pair, "fx-csqa", CORE, task_dir, limit=3, batch_size=1)
    b = run(llama_pair, "fx-csqa", CORE, task_dir, limit=3, batch_size=3)
    assert a.result.sample_scores == b.result.sample_scores
    assert a.sample_density == pytest.approx(b.sample_density)

    g1 = run(llama_pair, "fx-triviaqa", CORE, task_dir, limit=3, batch_size=1)
    g4 = run(llama_pair, "fx-triviaqa", CORE, task_dir, limit=3, batch_size=3)
    resps = [s["resps"] for s in g1.raw["samples"]["fx-triviaqa"]]
    assert [s["resps"] for s in g4.raw["samples"]["fx-triviaqa"]] == resps
    assert g1.sample_density == pytest.approx(g4.sample_density)


def test_levels_method_scores_with_per_layer_keep(llama_pair):
    from autosparse.tasks.lm import SparseLM

    model, tok = llama_pair
    lm = SparseLM(model, tok, max_length=MAX_LEN)
    with lm.sparse(Method.levels([0.2, 0.5])):
        lm._loglikelihood_tokens(_requests(tok, PAIRS))
    low, high = lm.layer_density()
    assert 0 < low <= 0.2 < high <= 0.5
    assert lm.realized_density() == pytest.approx((low + high) / 2)


def test_opt_multiple_choice_runs_sparse(task_dir):
    from conftest import tiny_opt

    from autosparse.tasks import run_task

    pair = (tiny_opt(), tiny_tokenizer())
    kw = dict(include_path=task_dir, num_fewshot=0, limit=2, progress=False)
    dense = run_task(pair, "fx-csqa", Method.dense(), **kw)
    sparse = run_task(pair, "fx-csqa", CORE, **kw)
    assert sparse.result.sample_ids == dense.result.sample_ids
    # ReLU: the realized density can fall below the keep ratio, never above it
    assert 0 < sparse.result.density <= 0.3

    def lls(run_):
        return [r[0][0] for s in run_.raw["samples"]["fx-csqa"] for r in s["resps"]]

    assert lls(sparse) != pytest.approx(lls(dense), abs=1e-6)


# -- prepared requests (the tuning screen's path) ------------------------------------


@pytest.mark.parametrize(
    "task, options",
    [
        ("fx-triviaqa", {}),
        ("fx-wmt16", {}),  # corpus-level bleu aggregation
        ("fx-csqa", {"batch_size": 4}),
        ("fx-squadv2", {"num_fewshot": 0, "metric": "exact"}),
    ],
)
def test_prepared_task_gives_what_run_task_gives(llama_pair, task_dir, task, options):
    from autosparse.tasks.prepared import PreparedTask

    options = {"num_fewshot": 1, **options}
    ids = [0, 2, 3, 5]
    prepared = PreparedTask(
        llama_pair, task, ids, include_path=task_dir, max_length=MAX_LEN, **options
    )
    for method in (Method.dense(), CORE):
        want = run(llama_pair, task, method, task_dir, ids=ids, **options)
        got = prepared.run(method)
        assert got.result.sample_ids == want.result.sample_ids == ids
        assert got.result.metric == want.result.metric
        assert got.result.score == pytest.approx(want.result.score)
        assert got.result.metrics == pytest.approx(want.result.metrics)
        assert got.result.sample_scores == pytest.approx(want.result.sample_scores)
        assert got.result.density == want.result.density
        assert got.sample_density == want.sample_density
        assert got.result.settings == want.result.settings | {"limit": None}


def test_prepared_subsets_keep_each_document_prompt_and_score(llama_pair, task_dir):
    from autosparse.errors import TaskError
    from autosparse.tasks.prepared import PreparedTask

    ids = [0, 1, 2, 3, 4, 5]
    prepared = PreparedTask(
        llama_pair, "fx-csqa", ids, include_path=task_dir, max_length=MAX_LEN, num_fewshot=2
    )
    whole = prepared.run(CORE)
    prompts = {s["doc_id"]: s["arguments"] for s in whole.raw["samples"]["fx-csqa"]}
    for part in ([4, 1], [5]):
        got = prepared.run(CORE, part)
        assert got.result.sample_ids == sorted(part)
        by_id = dict(zip(whole.result.sample_ids, whole.result.sample_scores, strict=True))
        assert got.result.sample_scores == [by_id[i] for i in sorted(part)]
        for s in got.raw["samples"]["fx-csqa"]:
            assert s["arguments"] == prompts[s["doc_id"]]
    # simple_evaluate on a subset draws the few-shot examples differently
    alone = run(llama_pair, "fx-csqa", CORE, task_dir, ids=[4, 5], num_fewshot=2)
    alone_prompts = {s["doc_id"]: s["arguments"] for s in alone.raw["samples"]["fx-csqa"]}
    assert any(alone_prompts[i] != prompts[i] for i in (4, 5))
    # answering again gives the same result (responses are reset between runs)
    assert prepared.run(CORE).result.sample_scores == whole.result.sample_scores
    with pytest.raises(TaskError, match="not prepared"):
        prepared.run(CORE, [0, 7])


def test_task_evaluator_answers_screen_slices_with_the_screen_prompts(llama_pair, tmp_path):
    from types import SimpleNamespace

    from autosparse.store import ResultStore
    from autosparse.tasks.evaluator import EvaluatorOptions, TaskEvaluator

    model, tok = llama_pair
    loaded = SimpleNamespace(model=model, tokenizer=tok, dtype=model.dtype)
    store = ResultStore(f"sqlite:///{tmp_path / 'r.db'}")
    evaluator = TaskEvaluator(
        loaded,
        EvaluatorOptions(
            model_id="tiny",
            task="csqa-local",
            num_fewshot=2,
            batch_size=4,
            store=store,
            progress=False,
        ),
    )
    screen = [3, 10, 17, 40, 41, 52]
    evaluator.prepare(screen)
    whole = evaluator.run(CORE, screen)
    part = evaluator.run(CORE, [41, 10])
    assert part.sample_ids == [10, 41]
    assert part.sample_scores == [whole.sample_scores[1], whole.sample_scores[4]]
    assert part.settings["prompts_of"] == screen and "prompts_of" not in whole.settings
    # outside the prepared screen: lm-eval's own path, cached under its own settings
    other = evaluator.run(CORE, [3, 99])
    assert other.sample_ids == [3, 99] and "prompts_of" not in other.settings
    assert store.find("tiny", "csqa-local", CORE, part.settings) is not None


# -- batched generation, each sequence stopping on its own ----------------------------

GEN_CONTEXTS = [
    "Question: where do fish live?\nAnswer:",
    "The capital of France is",
    "Two plus two makes",
    "Once upon a time there was",
]


class ForwardCalls:
    """Forward calls of a model: how many, and the largest batch a prefill had."""

    def __init__(self, model):
        self.calls, self.widest = 0, 0
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        self.calls += 1
        cache = kwargs.get("past_key_values")
        if cache is None or cache.get_seq_length() == 0:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.widest = max(self.widest, int(ids.shape[0]))

    def remove(self) -> None:
        self._handle.remove()


def _generate(pair, contexts, until, batch_size, max_gen_toks=24):
    from lm_eval.api.instance import Instance

    from autosparse.tasks.lm import SparseLM

    model, tok = pair
    lm = SparseLM(model, tok, batch_size=batch_size, max_length=MAX_LEN)
    settings = {"until": until, "do_sample": False, "max_gen_toks": max_gen_toks}
    requests = [
        Instance("generate_until", {}, (c, dict(settings)), i) for i, c in enumerate(contexts)
    ]
    calls = ForwardCalls(model)
    try:
        with lm.sparse(CORE):
            out = lm.generate_until(requests)
    finally:
        calls.remove()
    return out, calls


def test_batched_generation_stops_each_sequence_and_equals_singles(llama_pair):
    free, calls = _generate(llama_pair, GEN_CONTEXTS, ["<never>"], batch_size=4)
    assert calls.calls == 24 and all(len(t) == 24 for t in free)  # one token per character
    # stop strings: each row's second character (the random model repeats characters);
    # every row stops at the first of them it meets, rows at different steps
    stops = sorted({next(ch for ch in text[1:] if ch.strip()) for text in free})
    singles, steps = [], []
    for context in GEN_CONTEXTS:
        out, calls = _generate(llama_pair, [context], stops, batch_size=1)
        singles += out
        steps.append(calls.calls)
    assert max(steps) < 24 and len(set(steps)) > 1  # rows stop early, at different steps
    for text, alone in zip(free, singles, strict=True):
        assert text.startswith(alone) and not any(s in alone for s in stops)

    batched, calls = _generate(llama_pair, GEN_CONTEXTS, stops, batch_size=4)
    assert batched == singles
    assert calls.widest == 4  # one batch of four
    # the batch ends with its last row, not when every row met the same stop string
    assert calls.calls == max(steps)


@pytest.mark.parametrize("path", ["run_task", "prepared"])
def test_task_generation_batch_of_four_equals_four_singles(llama_pair, task_dir, path):
    from autosparse.tasks.prepared import PreparedTask

    ids = [0, 2, 3, 5]

    def answers(batch_size):
        calls = ForwardCalls(llama_pair[0])
        try:
            if path == "prepared":
                prepared = PreparedTask(
                    llama_pair,
                    "fx-triviaqa",
                    ids,
                    include_path=task_dir,
                    max_length=MAX_LEN,
                    num_fewshot=1,
                    batch_size=batch_size,
                )
                got = prepared.run(CORE)
                resps = [inst.resps for i in ids for inst in prepared._instances[i]]
            else:
                got = run(llama_pair, "fx-triviaqa", CORE, task_dir, ids=ids, batch_size=batch_size)
                resps = [s["resps"] for s in got.raw["samples"]["fx-triviaqa"]]
        finally:
            calls.remove()
        return got, resps, calls.widest

    singles, single_resps, widest_single = answers(1)
    batch, batch_resps, widest_batch = answers(4)
    assert (widest_single, widest_batch) == (1, 4)
    assert batch_resps == single_resps and len(single_resps) == 4
    assert batch.result.sample_scores == singles.result.sample_scores
    assert batch.sample_density == pytest.approx(singles.sample_density)
