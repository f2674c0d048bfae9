"""GRIFFIN's selection rule: the pure statistics against a plain loop, and the engine
selecting with it on tiny Llama and OPT models (masked and sliced, padded batches,
continuation scoring, realized density)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama, tiny_opt

from autosparse.engine import SparseEngine, keep_count, select_core_neurons
from autosparse.engine.prompts import continue_prompts, run_prompts
from autosparse.engine.selection import griffin_statistics
from autosparse.errors import ConfigError

LAYERS = "1:3"
PROMPT = torch.tensor([[5, 17, 42, 99, 7, 3, 18, 64, 120, 33, 11, 90]])


def plain_griffin(acts, valid, keep):
    """The rule written from docs/method.md with Python loops, in float64: per sequence,
    the set of kept neuron ids and every neuron's score."""
    out = []
    for b in range(acts.shape[0]):
        n = acts.shape[2]
        squares = [0.0] * n
        for t in range(acts.shape[1]):
            if not valid[b, t]:
                continue
            row = [float(x) for x in acts[b, t]]
            norm = math.sqrt(sum(x * x for x in row))
            if norm == 0.0:
                continue  # a zero-norm token contributes nothing
            for i in range(n):
                squares[i] += (row[i] / norm) ** 2
        scores = [math.sqrt(s) for s in squares]
        ranked = sorted(range(n), key=lambda i: (-scores[i], i))
        out.append((set(ranked[: keep_count(keep, n)]), scores))
    return out


def random_case(seed=0, bsz=4, tokens=9, n=40):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(bsz, tokens, n, generator=g)
    acts[:, :, n - 5 :] = 0.0  # never active: ties at score 0, broken by the lower id
    valid = torch.ones(bsz, tokens, dtype=torch.bool)
    valid[1, :4] = False  # left padding
    valid[2, 6:] = False  # continuation tokens
    acts[~valid] = 1e4 * torch.rand(int((~valid).sum()), n, generator=g)  # must not count
    acts[3, 2] = 0.0  # a zero-norm prompt token
    acts[0, 5] *= 1e3  # a loud token: normalization gives it the same weight as the others
    return acts, valid


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.55, 0.9, 1.0])
def test_griffin_equals_a_plain_loop(keep):
    acts, valid = random_case()
    sel = select_core_neurons(acts, valid, keep, token_ratio=0.2, selector="griffin")
    want = plain_griffin(acts, valid, keep)
    _, score = griffin_statistics(acts, valid)
    n = acts.shape[2]
    for b, (ids, scores) in enumerate(want):
        assert int(sel.kept[b]) == keep_count(keep, n)  # always exactly the planned count
        assert set(sel.ids(b).tolist()) == ids
        assert set(sel.mask[b].nonzero().flatten().tolist()) == ids
        torch.testing.assert_close(score[b].double(), torch.tensor(scores, dtype=torch.float64))


def test_griffin_ignores_token_scale_and_differs_from_votes():
    acts, valid = random_case(seed=3)
    base = select_core_neurons(acts, valid, 0.3, 0.2, selector="griffin")
    scaled = acts.clone()
    scaled[:, 1] *= 50.0  # one token louder: every token is normalized first
    again = select_core_neurons(scaled, valid, 0.3, 0.2, selector="griffin")
    assert torch.equal(base.mask, again.mask)
    votes = select_core_neurons(acts, valid, 0.3, 0.2)
    assert not torch.equal(base.mask, votes.mask)


def test_griffin_keeps_the_lowest_ids_when_nothing_is_counted():
    acts = torch.randn(1, 4, 10)
    sel = select_core_neurons(acts, torch.zeros(1, 4, dtype=torch.bool), 0.3, 0.2, "griffin")
    assert sel.ids(0).tolist() == [0, 1, 2]


def test_unknown_selector_is_refused(llama):
    with pytest.raises(ConfigError, match="unknown selector 'votes'"):
        SparseEngine(llama, 0.4, selector="votes")


# ------------------------------------------------------------------- the engine


def generate(model, ids, attention_mask=None, new=5):
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=attention_mask if attention_mask is not None else torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=model.config.pad_token_id,
        )
    return out.sequences, torch.stack(out.logits, dim=1)


def down_inputs(model, ids):
    """Each decoder layer's (1, T, N) input of the down projection in a dense pass."""
    from autosparse.adapters import adapter_for

    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    seen: dict[int, torch.Tensor] = {}
    removers = [
        adapter.capture_activations(layer, lambda a, i=i: seen.__setitem__(i, a.detach()))
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for remove in removers:
            remove()
    out = {}
    for i, a in seen.items():
        a = a.view(1, ids.shape[1], -1)
        out[i] = torch.relu(a) if adapter.kind == "relu" else a  # OPT: fc2's input
    return out


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_the_engine_ranks_the_down_projection_input(make):
    model = make()
    acts = down_inputs(model, PROMPT)
    valid = torch.ones(PROMPT.shape, dtype=torch.bool)
    with SparseEngine(model, 0.35, layers=LAYERS, selector="griffin") as engine:
        with torch.no_grad():
            model(PROMPT, use_cache=True)
        for rt in engine.runtimes:
            ((want, _),) = plain_griffin(acts[rt.layer], valid, 0.35)
            assert set(rt.selection.ids(0).tolist()) == want


# masked == sliced and padded batches == singles under GRIFFIN: tests/test_engine.py,
# parametrized by selector


def test_griffin_realizes_exactly_its_keep_where_votes_fall_short(opt):
    n = opt.config.ffn_dim
    with SparseEngine(opt, 0.9, layers=LAYERS, selector="griffin") as engine:
        generate(opt, PROMPT, new=2)
    assert engine.kept_counts().tolist() == [[keep_count(0.9, n)] * 2]
    assert engine.realized_density() == pytest.approx(keep_count(0.9, n) / n)
    with SparseEngine(opt, 0.9, layers=LAYERS) as votes:
        generate(opt, PROMPT, new=2)
    assert votes.realized_density() < engine.realized_density()


def test_griffin_continuation_scoring_selects_from_the_prompt_only(any_model):
    prompt_len = PROMPT.shape[1]
    answer = torch.tensor([[44, 12, 200, 9, 31]])
    full = torch.cat([PROMPT, answer], dim=1)
    with torch.no_grad(), SparseEngine(any_model, 0.3, layers=LAYERS, selector="griffin") as e:
        with e.scoring([prompt_len]):
            scored = any_model(full).logits
        scored_masks = [rt.selection.mask.clone() for rt in e.runtimes]
        out = any_model(PROMPT, use_cache=True)  # the prompt alone, then the answer stepwise
        prompt_masks = [rt.selection.mask.clone() for rt in e.runtimes]
        cache, steps = out.past_key_values, [out.logits]
        for t in range(answer.shape[1]):
            out = any_model(answer[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    for a, b in zip(scored_masks, prompt_masks, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(scored, torch.cat(steps, dim=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_kept_griffin_prompts_continue_as_one_pass_and_refuse_votes(make):
    model = make()
    prompts, continuations = [list(range(5, 25)), [3, 4, 5]], [[7, 8, 9], [14, 15]]
    done = run_prompts(model, prompts, token_ratio=0.5, selector="griffin")
    # GRIFFIN has no token ratio: kept prompts serve an engine of any token ratio
    with SparseEngine(model, 0.3, mode="sliced", selector="griffin") as engine:
        got = continue_prompts(model, done, continuations, engine)
        kept = engine.kept_counts()
    with SparseEngine(model, 0.3, mode="sliced", selector="griffin") as engine:
        want = []
        for p, c in zip(prompts, continuations, strict=True):
            x = torch.tensor([p + c[:-1]])
            with engine.scoring([len(p)]), torch.no_grad():
                logits = model(input_ids=x, use_cache=False).logits[0]
            want.append(torch.log_softmax(logits[len(p) - 1 :].float(), dim=-1))
        want_kept = engine.kept_counts()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert torch.equal(kept, want_kept)
    with SparseEngine(model, 0.3, token_ratio=0.5) as votes:
        with pytest.raises(ConfigError, match="another selector"):
            continue_prompts(model, done, continuations, votes)
