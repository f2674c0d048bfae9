"""The fidelity objective: dense references generated once, teacher-forced sparse scoring."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

from autosparse.errors import ConfigError
from autosparse.fidelity.evaluator import FidelityEvaluator
from autosparse.fidelity.scoring import topk_kl
from autosparse.methods import Method
from autosparse.stats import SampleMismatchError, paired_difference
from autosparse.store import ResultStore
from autosparse.tasks.evaluator import EvaluatorOptions

PROMPTS = {
    i: f"The quick brown fox {i} jumps over the lazy dog {i * 7} times. " * (1 + i % 3)
    for i in range(12)
}


def sharp_llama():
    """A tiny Llama whose weight matrices are scaled up, so its next-token distributions
    are peaked and sparsity visibly moves them (a random init is nearly uniform)."""
    model = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return model


FIDELITY_ARGS = ("max_new_tokens", "min_new_tokens", "top_k", "prompts")


def make(model=None, store=None, **kw):
    kw.setdefault("max_new_tokens", 10)
    kw.setdefault("min_new_tokens", 10)
    kw.setdefault("batch_size", 4)
    kw.setdefault("prompts", PROMPTS)
    own = {k: kw.pop(k) for k in FIDELITY_ARGS if k in kw}
    return FidelityEvaluator(
        (model if model is not None else sharp_llama(), tiny_tokenizer()),
        EvaluatorOptions(model_id="tiny", task="toy", store=store, progress=False, **kw),
        **own,
    )


def fidelity_of(model, task: str, *, max_new_tokens: int = 32, **options):
    return FidelityEvaluator(
        model,
        EvaluatorOptions(model_id="t", task=task, progress=False, **options),
        max_new_tokens=max_new_tokens,
    )


class CountingGenerate:
    def __init__(self, model):
        self.calls = 0
        self.inner = model.generate
        model.generate = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_dense_continuation_is_generated_once_and_reused(tmp_path):
    model = sharp_llama()
    counter = CountingGenerate(model)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    with ResultStore(url) as store:
        ev = make(model, store)
        ids = ev.document_ids()
        ev.run(Method.coreinfer(0.5), ids[:6])
        assert counter.calls == 2  # 6 documents in batches of 4
        for keep in (0.3, 0.7):
            ev.run(Method.coreinfer(keep), ids[:6])
        ev.run(Method.dense(), ids[:4])
        assert counter.calls == 2
        ev.run(Method.coreinfer(0.5), ids)  # only the 6 new documents are generated
        assert counter.calls == 4
        assert ev.generate_calls == 4
        refs = {i: ev.references([i])[i].continuation for i in ids}

    # a resumed study (new evaluator, same database) never regenerates
    with ResultStore(url) as store:
        again = make(model, store)
        r = again.run(Method.coreinfer(0.4), ids)
        assert counter.calls == 4 and again.generate_calls == 0
        assert {i: again.references([i])[i].continuation for i in ids} == refs
        assert "reference_seconds" in r.metrics  # time to fetch them, kept apart from scoring

        # a changed prompt is regenerated; other settings give other references
        changed = {**PROMPTS, 0: "Something else entirely. "}
        make(model, store, prompts=changed).references(ids)
        assert counter.calls == 5
        make(model, store, max_new_tokens=6, min_new_tokens=6).references([1])
        assert counter.calls == 6


def test_references_have_the_requested_length():
    ev = make(max_new_tokens=7, min_new_tokens=7)
    for ref in ev.references(ev.document_ids()).values():
        assert len(ref.continuation) == 7
        assert ref.top_ids.shape == ref.top_logprobs.shape == (7, 64)
        assert len(ref.prompt_ids) >= 1


def test_keep_one_gives_exactly_the_dense_fidelity():
    ev = make()
    ids = ev.document_ids()
    dense = ev.run(Method.dense(), ids)
    full = ev.run(Method.coreinfer(1.0), ids)
    assert full.sample_scores == dense.sample_scores
    assert full.metrics["kl"] == dense.metrics["kl"]
    assert dense.density is None and full.density == pytest.approx(1.0)
    # the dense score reproduces the references' own dense log-likelihood
    refs = ev.references(ids)
    assert dense.sample_scores == pytest.approx([refs[i].dense_fidelity for i in ids], abs=1e-5)
    assert dense.metrics["kl"] == pytest.approx(0.0, abs=1e-6)


def test_fidelity_falls_as_the_keep_ratio_falls():
    ev = make(max_new_tokens=16, min_new_tokens=16)
    ids = ev.document_ids()
    keeps = (1.0, 0.6, 0.3, 0.1)
    runs = [ev.run(Method.coreinfer(k), ids) for k in keeps]
    fid = [r.metrics["fidelity"] for r in runs]
    kl = [r.metrics["kl"] for r in runs]
    dens = [r.density for r in runs]
    assert all(a > b for a, b in zip(fid, fid[1:], strict=False)), fid
    assert all(a < b for a, b in zip(kl, kl[1:], strict=False)), kl
    assert all(a > b for a, b in zip(dens, dens[1:], strict=False)), dens
    # averaged over 12 prompts the drop is far from noise
    assert fid[0] - fid[-1] > 0.1


def test_batched_equals_unbatched(tmp_path):
    with ResultStore(f"sqlite:///{tmp_path / 's.db'}") as store:
        model = sharp_llama()
        batched = make(model, store, batch_size=5)
        ids = batched.document_ids()
        batched.references(ids)
        single = make(model, store, batch_size=1)  # same references, from the store
        for method in (Method.coreinfer(0.4), Method.levels([0.2, 0.5])):
            a, b = batched.run(method, ids), single.run(method, ids)
            assert a.sample_ids == b.sample_ids == ids
            assert a.sample_scores == pytest.approx(b.sample_scores, abs=1e-4)
            assert a.metrics["kl"] == pytest.approx(b.metrics["kl"], abs=1e-5)
            assert a.density == pytest.approx(b.density)
            assert a.layer_density == pytest.approx(b.layer_density)


def test_per_sample_scores_follow_sorted_ids():
    ev = make()
    shuffled = [7, 2, 11, 0, 5, 2]
    r = ev.run(Method.coreinfer(0.4), shuffled)
    assert r.sample_ids == [0, 2, 5, 7, 11]
    for i, score in zip(r.sample_ids, r.sample_scores, strict=True):
        alone = ev.run(Method.coreinfer(0.4), [i])
        assert alone.sample_scores == pytest.approx([score], abs=1e-4)
    assert r.score == pytest.approx(sum(r.sample_scores) / len(r.sample_scores))


def test_paired_interval_only_on_matching_ids():
    ev = make()
    ids = ev.document_ids()
    base = ev.run(Method.coreinfer(0.4), ids)
    other = ev.run(Method.coreinfer(0.8), ids)
    d = paired_difference(
        other.sample_ids, other.sample_scores, base.sample_ids, base.sample_scores
    )
    assert d.n == len(ids) and d.mean > 0
    assert d.low <= d.mean <= d.high
    part = ev.run(Method.coreinfer(0.8), ids[:6])
    with pytest.raises(SampleMismatchError, match="only in the second"):
        paired_difference(part.sample_ids, part.sample_scores, base.sample_ids, base.sample_scores)
    sub = paired_difference(
        part.sample_ids,
        part.sample_scores,
        base.sample_ids,
        base.sample_scores,
        allow_subset=True,
    )
    assert sub.n == 6


def test_kl_metric_is_negated_so_higher_is_better():
    ev = make(metric="kl")
    assert ev.metric == "neg_kl"
    ids = ev.document_ids()[:5]
    low, high = ev.run(Method.coreinfer(0.2), ids), ev.run(Method.coreinfer(0.9), ids)
    assert high.score > low.score
    assert low.score == pytest.approx(-low.metrics["kl"])
    assert all(s <= 0 for s in low.sample_scores)
    with pytest.raises(ConfigError, match="fidelity or kl"):
        make(metric="bleu")


def test_results_are_cached_in_the_store(tmp_path):
    with ResultStore(f"sqlite:///{tmp_path / 's.db'}") as store:
        ev = make(store=store)
        ids = ev.document_ids()[:4]
        first = ev.run(Method.coreinfer(0.4), ids)
        hit = ev.run(Method.coreinfer(0.4), ids)
        assert hit.sample_scores == first.sample_scores and hit.seconds == first.seconds
        assert hit.settings["objective"] == "fidelity"
        assert len(store.list()) == 1


def test_topk_kl_matches_the_exact_kl_with_the_full_vocabulary():
    g = torch.Generator().manual_seed(0)
    dense = torch.log_softmax(3 * torch.randn(6, 50, generator=g), -1)
    sparse = torch.log_softmax(dense + 0.5 * torch.randn(6, 50, generator=g), -1)
    exact = (dense.exp() * (dense - sparse)).sum(-1)
    top, ids = dense.topk(50, dim=-1)
    assert topk_kl(top, ids, sparse) == pytest.approx(exact.tolist(), abs=1e-5)
    previous = None
    for k in (1, 5, 20, 49):
        top, ids = dense.topk(k, dim=-1)
        kl = topk_kl(top, ids, sparse)
        assert (kl >= 0).all() and (kl <= exact + 1e-5).all()  # coarse-graining: a lower bound
        if previous is not None:
            assert (kl >= previous - 1e-5).all()  # a finer partition never lowers it
        previous = kl
    same = topk_kl(*dense.topk(8, dim=-1), dense)
    assert same.abs().max() < 1e-6


def test_task_prompts_and_few_shot_are_deterministic_per_document():
    from autosparse.tasks.registry import load_task
    from autosparse.tasks.sampling import prompt_text

    tok = tiny_tokenizer()
    zero = fidelity_of((tiny_llama(), tok), "csqa-local", num_fewshot=0)
    _, task = load_task("csqa-local")
    for i in (0, 17):
        assert zero.prompt(i) == prompt_text(task, task.eval_docs[i])
    shots = fidelity_of((tiny_llama(), tok), "csqa-local", num_fewshot=2)
    a = [shots.prompt(i) for i in (3, 9, 4)]
    b = [shots.prompt(i) for i in (4, 3, 9)]
    assert a == [b[1], b[2], b[0]]
    assert a[0].endswith(zero.prompt(3)) and len(a[0]) > len(zero.prompt(3))
    assert shots.reference_settings()["num_fewshot"] == 2
    # the task's own size, and references on real prompts
    assert len(zero.document_ids()) == len(task.eval_docs)
    r = fidelity_of((tiny_llama(), tok), "csqa-local", num_fewshot=0, max_new_tokens=4).run(
        Method.coreinfer(0.5), [1, 2]
    )
    assert r.sample_ids == [1, 2] and all(math.isfinite(s) for s in r.sample_scores)


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError):
        make(max_new_tokens=0)
    with pytest.raises(ConfigError):
        make(batch_size=0)
    with pytest.raises(ConfigError, match="no documents"):
        make().run(Method.dense(), [])


def test_random_levels_vectors_run():
    ev = make()
    rng = random.Random(0)
    levels = [round(rng.uniform(0.1, 0.9), 2) for _ in range(2)]
    r = ev.run(Method.levels(levels), ev.document_ids()[:3])
    assert r.layer_density is not None and len(r.layer_density) == 2


def test_prompts_run_once_per_batch_and_give_the_one_pass_scores():
    model = sharp_llama()
    cached, one_pass = make(model), make(model, prompt_cache_gb=0)
    ids = cached.document_ids()[:8]
    for method in (Method.coreinfer(0.3), Method.levels([0.2, 0.6]), Method.dense()):
        a, b = cached.run(method, ids), one_pass.run(method, ids)
        assert a.sample_scores == pytest.approx(b.sample_scores, abs=1e-4)
        assert a.metrics["kl"] == pytest.approx(b.metrics["kl"], abs=1e-4)
        assert a.density == b.density
    assert cached.prompt_cache.runs == 2  # 8 documents in batches of 4, for every method
    assert one_pass.prompt_cache.runs == 0
    cached.run(Method.coreinfer(0.3, token_ratio=0.4), ids)  # other statistics
    assert cached.prompt_cache.runs == 4


def test_the_prompt_cache_stays_under_its_budget():
    ev = make(prompt_cache_gb=1e-9)  # room for nothing but the batch in use
    ids = ev.document_ids()[:8]
    ev.run(Method.coreinfer(0.3), ids)
    assert len(ev.prompt_cache) == 1
    ev.run(Method.coreinfer(0.5), ids)
    assert ev.prompt_cache.runs == 4


def test_one_factory_builds_the_evaluator_of_each_objective():
    from autosparse.evaluate import make_evaluator
    from autosparse.tasks.evaluator import TaskEvaluator

    loads = []

    def loader():
        loads.append(1)
        return tiny_llama(), tiny_tokenizer()

    options = EvaluatorOptions(model_id="t", task="csqa-local", metric="acc", progress=False)
    task = make_evaluator("task", loader, options)
    assert isinstance(task, TaskEvaluator) and task.metric == "acc"
    kl = make_evaluator("kl", loader, options)
    assert isinstance(kl, FidelityEvaluator) and kl.metric == "neg_kl"
    assert kl.options.prompt_cache_gb == options.prompt_cache_gb
    assert make_evaluator("fidelity", loader, options).metric == "fidelity"
    assert loads == []  # building an evaluator loads no model
    with pytest.raises(ConfigError, match="objective"):
        make_evaluator("bleu", loader, options)


def test_a_stored_result_is_found_before_the_model_is_loaded(tmp_path):
    model = sharp_llama()
    with ResultStore(f"sqlite:///{tmp_path / 's.db'}") as store:
        first = make(model, store).run(Method.coreinfer(0.4), [0, 1, 2])

        def loader():
            raise AssertionError("loaded")

        lazy = FidelityEvaluator(
            loader,
            EvaluatorOptions(
                model_id="tiny", task="toy", batch_size=4, dtype="float32", store=store
            ),
            max_new_tokens=10,
            min_new_tokens=10,
            prompts=PROMPTS,
        )
        assert lazy.find(Method.coreinfer(0.4), [2, 1, 0]).sample_scores == first.sample_scores
        assert lazy.run(Method.coreinfer(0.4), [0, 1, 2]).sample_scores == first.sample_scores
        assert lazy.find(Method.coreinfer(0.5), [0, 1, 2]) is None
        with pytest.raises(AssertionError, match="loaded"):
            lazy.run(Method.coreinfer(0.5), [0, 1, 2])
