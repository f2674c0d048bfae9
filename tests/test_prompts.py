"""Prompts run once and continued under any method (engine.prompts) equal one pass over
prompt + continuation under engine.scoring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama, tiny_opt

from autosparse.engine import SparseEngine
from autosparse.engine.prompts import continue_prompts, run_prompts
from autosparse.errors import ConfigError

PROMPTS = [list(range(5, 25)), list(range(30, 42)), [3, 4, 5]]
CONTINUATIONS = [[7, 8, 9, 10, 11], [12, 13], [14]]


def one_pass(model, engine, prompt, continuation):
    x = torch.tensor([prompt + continuation[:-1]])
    with engine.scoring([len(prompt)]), torch.no_grad():
        logits = model(input_ids=x, use_cache=False).logits[0]
    return F.log_softmax(logits[len(prompt) - 1 :].float(), dim=-1)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
@pytest.mark.parametrize("mode", ["masked", "sliced"])
def test_continuing_kept_prompts_equals_one_pass(make, mode):
    model = make()
    done = run_prompts(model, PROMPTS, token_ratio=0.2)
    for keep in (0.3, [0.2, 0.6], 1.0):
        with SparseEngine(model, keep, mode=mode) as engine:
            got = continue_prompts(model, done, CONTINUATIONS, engine)
            again = continue_prompts(model, done, CONTINUATIONS, engine)  # cache restored
            kept = engine.kept_counts()
        with SparseEngine(model, keep, mode=mode) as engine:
            want = [
                one_pass(model, engine, p, c) for p, c in zip(PROMPTS, CONTINUATIONS, strict=True)
            ]
            want_kept = engine.kept_counts()
        for g, a, w, c in zip(got, again, want, CONTINUATIONS, strict=True):
            assert g.shape == (len(c), w.shape[-1])
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a, g)
        assert torch.equal(kept[: len(PROMPTS)], want_kept)  # the same core neurons


def test_dense_continuation_and_sparsity_changes_it():
    model = tiny_llama()
    done = run_prompts(model, PROMPTS)
    dense = continue_prompts(model, done, CONTINUATIONS)
    with SparseEngine(model, 0.2) as engine:
        sparse = continue_prompts(model, done, CONTINUATIONS, engine)
    # the first token comes from the dense prompt; later ones run sparse
    torch.testing.assert_close(dense[0][0], sparse[0][0])
    assert not torch.allclose(dense[0][1:], sparse[0][1:])


def test_mismatched_prompts_are_refused():
    model = tiny_llama()
    done = run_prompts(model, PROMPTS, token_ratio=0.2)
    with SparseEngine(model, 0.3, token_ratio=0.5) as engine:
        with pytest.raises(ConfigError, match="token ratio"):
            continue_prompts(model, done, CONTINUATIONS, engine)
    with pytest.raises(ConfigError, match="continuations for a batch"):
        continue_prompts(model, done, CONTINUATIONS[:2])
    with pytest.raises(ConfigError, match="at least one token"):
        run_prompts(model, [[1, 2], []])


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_sliced_scoring_passes_gather_nothing_but_decoding_does(make):
    """A scoring pass uses its weights once: sliced mode computes it masked (no gathered
    copies), with the masked mode's outputs. Decode steps after a prefill still gather."""
    model = make()
    done = run_prompts(model, PROMPTS, token_ratio=0.2)
    got = {}
    for mode in ("masked", "sliced"):
        with SparseEngine(model, 0.3, mode=mode) as engine:
            got[mode] = continue_prompts(model, done, CONTINUATIONS, engine)
            assert all(not rt.sliced for rt in engine.runtimes)
            one_pass(model, engine, PROMPTS[0], CONTINUATIONS[0])
            assert all(not rt.sliced for rt in engine.runtimes)
    for s, m in zip(got["sliced"], got["masked"], strict=True):
        torch.testing.assert_close(s, m, atol=1e-5, rtol=1e-5)
    with SparseEngine(model, 0.3, mode="sliced") as engine, torch.no_grad():
        out = model(input_ids=torch.tensor([PROMPTS[0]]), use_cache=True)
        assert all(rt.sliced for rt in engine.runtimes)  # gathered at the prefill
        model(input_ids=torch.tensor([[7]]), past_key_values=out.past_key_values)
        # kept prompts continued for decode steps (not one scoring pass) gather too
        engine.preselect(done.statistics, single_pass=False)
        assert all(not rt.sliced for rt in engine.runtimes)
