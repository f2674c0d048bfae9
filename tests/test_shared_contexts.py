"""Log-likelihood requests that share a prompt run it once (SparseLM's shared-context path)
and score what one forward pass per request row scores (the per-request path)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tiny_opt, tiny_tokenizer

from autosparse.methods import Method

QUESTION = "Question: where do fish live?\nAnswer:"
CHOICES = {
    QUESTION: [" in the water", " in a desert", " up a tree", "x", "y"],  # two one-token
    "The capital of France is": [" Paris", " Rome, of course", " Lyon"],
    "Two plus two makes": [" four"],
}
WIDE = 1024  # the tiny tokenizer spends one token per character
NARROW = 24  # cuts the question's prompt, by a different amount per answer length


def _requests(tok, extra=()):
    pairs = [(c, a) for c, answers in CHOICES.items() for a in answers] + list(extra)
    return [((c, a), tok.encode(c), tok.encode(a)) for c, a in pairs]


class PrefillRows:
    """Counts the rows of the model's forward calls that start sequences (no KV cache)."""

    def __init__(self, model):
        self.rows = 0
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is None or cache.get_seq_length() == 0:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.rows += int(ids.shape[0])

    def remove(self) -> None:
        self._handle.remove()


def _score(model, tok, method, requests, *, shared, batch_size, max_length=WIDE):
    from autosparse.tasks.lm import SparseLM

    lm = SparseLM(model, tok, batch_size=batch_size, max_length=max_length, shared_contexts=shared)
    counter = PrefillRows(model)
    try:
        with lm.sparse(method):
            out = lm._loglikelihood_tokens(requests)
    finally:
        counter.remove()
    densities = {c: lm.density_of([c]) for c in CHOICES}
    return out, lm.realized_density(), densities, counter.rows, lm.prompt_runs


def _choices_argmax(out):
    picks, start = [], 0
    for answers in CHOICES.values():
        scores = [ll for ll, _ in out[start : start + len(answers)]]
        picks.append(scores.index(max(scores)))
        start += len(answers)
    return picks


METHODS = [
    pytest.param("dense", None, id="dense"),
    pytest.param("coreinfer", "masked", id="coreinfer-masked"),
    pytest.param("coreinfer", "sliced", id="coreinfer-sliced"),
    pytest.param("levels", "masked", id="levels-masked"),
    pytest.param("levels", "sliced", id="levels-sliced"),
    pytest.param("griffin", "masked", id="griffin-masked"),
    pytest.param("griffin-levels", "sliced", id="griffin-levels-sliced"),
]


def _method(name, mode):
    if name == "dense":
        return Method.dense()
    if name == "coreinfer":
        return Method.coreinfer(0.3, mode=mode)
    if name == "griffin":
        return Method.coreinfer(0.3, mode=mode, selector="griffin")
    if name == "griffin-levels":
        return Method.levels([0.2, 0.5], mode=mode, selector="griffin")
    return Method.levels([0.2, 0.5], mode=mode)  # tiny models: layers 1..2 run sparse


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
@pytest.mark.parametrize("name, mode", METHODS)
def test_shared_context_scores_equal_per_request_scores(make, name, mode):
    model, tok = make(), tiny_tokenizer()
    method = _method(name, mode)
    requests = _requests(tok)
    want, want_density, want_by_context, want_rows, _ = _score(
        model, tok, method, requests, shared=False, batch_size=1
    )
    # per request: one row per request, except one-token answers sharing their prompt's row
    assert want_rows == len(requests) - 1
    for batch_size in (1, 3):  # 3: left-padded batches of prompts of different lengths
        got, density, by_context, rows, runs = _score(
            model, tok, method, requests, shared=True, batch_size=batch_size
        )
        assert [g for _, g in got] == [w for _, w in want]  # greedy flags
        torch.testing.assert_close(
            [ll for ll, _ in got], [ll for ll, _ in want], atol=1e-4, rtol=1e-5
        )
        assert _choices_argmax(got) == _choices_argmax(want)
        assert rows == runs == len(CHOICES)  # every prompt ran once
        if name == "dense":
            assert density is None and want_density is None
        else:
            # the same core neurons: realized densities agree, per document too
            assert density == pytest.approx(want_density)
            assert by_context == pytest.approx(want_by_context)
            assert 0 < density <= 0.5


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_prompts_cut_to_the_window_and_overlong_answers(make):
    """With a short window lm-eval cuts each row from the left, so a prompt shared by
    answers of different lengths becomes several prompts; an answer that fills the whole
    window has no prompt and takes the per-request path."""
    model, tok = make(), tiny_tokenizer()
    overlong = ("Two plus two makes", " four, and two times two also makes four")
    requests = _requests(tok, [overlong])
    for method in (Method.dense(), Method.coreinfer(0.3, mode="sliced")):
        want, *_ = _score(
            model, tok, method, requests, shared=False, batch_size=2, max_length=NARROW
        )
        got, _, _, rows, runs = _score(
            model, tok, method, requests, shared=True, batch_size=2, max_length=NARROW
        )
        torch.testing.assert_close(
            [ll for ll, _ in got], [ll for ll, _ in want], atol=1e-4, rtol=1e-5
        )
        assert [g for _, g in got] == [w for _, w in want]
        # cut prompts: the question's five answers have four lengths ("x" and "y"
        # share), France's three answers three; "Two plus two makes" fits whole; the
        # overlong answer runs in one pass of its own
        assert runs == 4 + 3 + 1
        assert rows == runs + 1


def test_take_rows_repeats_prompts_and_leaves_the_source_intact():
    from autosparse.engine import SparseEngine
    from autosparse.engine.prompts import continue_prompts, run_prompts, take_rows

    model = tiny_llama()
    prompts = [list(range(5, 25)), [3, 4, 5]]
    continuations = [[7, 8, 9], [10, 11], [12, 13, 14]]
    done = run_prompts(model, prompts)
    length = done.cache.get_seq_length()
    with SparseEngine(model, 0.3) as engine:
        rows = take_rows(done, [1, 0, 1])
        got = continue_prompts(model, rows, continuations, engine)
        kept = engine.kept_counts()
        engine.reset_records()
        alone = [
            continue_prompts(model, take_rows(done, [r]), [c], engine)[0]
            for r, c in zip([1, 0, 1], continuations, strict=True)
        ]
        assert torch.equal(engine.kept_counts(), kept)
    for g, a in zip(got, alone, strict=True):
        torch.testing.assert_close(g, a, atol=1e-5, rtol=1e-5)
    assert rows.lengths == [3, 20, 3] and done.lengths == [20, 3]
    assert done.cache.get_seq_length() == length and done.cache.layers[0].keys.shape[0] == 2
    assert torch.equal(kept[0], kept[2])
