"""The sparse engine on tiny Llama and OPT models built from a config."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tiny_opt

from autosparse.engine import SparseEngine
from autosparse.errors import ConfigError, UnsupportedModelError

LAYERS = "1:3"
PROMPT = torch.tensor([[5, 17, 42, 99, 7, 3, 18, 64, 120, 33, 11, 90]])


def generate(model, ids, attention_mask=None, new=6):
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
    return out.sequences, torch.stack(out.logits, dim=1)  # (B, steps, V)


@pytest.mark.parametrize("mode", ["masked", "sliced"])
def test_keep_one_equals_dense_exactly(any_model, mode):
    dense_tokens, dense_logits = generate(any_model, PROMPT)
    with SparseEngine(any_model, 1.0, layers=LAYERS, mode=mode) as engine:
        tokens, logits = generate(any_model, PROMPT)
    assert torch.equal(tokens, dense_tokens)
    assert torch.equal(logits, dense_logits)
    assert engine.realized_density() == 1.0


@pytest.mark.parametrize("keep", [0.2, 0.5])
def test_sparse_decode_changes_logits(any_model, keep):
    _, dense_logits = generate(any_model, PROMPT)
    with SparseEngine(any_model, keep, layers=LAYERS):
        _, logits = generate(any_model, PROMPT)
    # The first token comes from the (dense) prefill; every later step runs sparse.
    assert torch.equal(logits[:, 0], dense_logits[:, 0])
    assert not torch.allclose(logits[:, 1:], dense_logits[:, 1:])


@pytest.mark.parametrize("selector", ["coreinfer", "griffin"])
@pytest.mark.parametrize("keep", [0.3, [0.2, 0.7]])
def test_masked_equals_sliced(any_model, keep, selector):
    ids = torch.cat([PROMPT, PROMPT.flip(1)])
    on = {"layers": LAYERS, "selector": selector}
    with SparseEngine(any_model, keep, mode="masked", **on) as masked:
        m_tokens, m_logits = generate(any_model, ids)
    with SparseEngine(any_model, keep, mode="sliced", **on) as sliced:
        s_tokens, s_logits = generate(any_model, ids)
    assert torch.equal(m_tokens, s_tokens)
    torch.testing.assert_close(s_logits, m_logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(masked.kept_counts(), sliced.kept_counts())


@pytest.mark.parametrize("selector", ["coreinfer", "griffin"])
@pytest.mark.parametrize("mode", ["masked", "sliced"])
def test_padded_batch_equals_singles(any_model, mode, selector):
    long = PROMPT[0]
    short = torch.tensor([8, 21, 77, 4, 150, 63])
    pad = any_model.config.pad_token_id
    batch = torch.full((2, len(long)), pad)
    batch[0] = long
    batch[1, -len(short) :] = short  # left padding, as generation does
    mask = (torch.arange(len(long)) >= len(long) - len(short)).long().unsqueeze(0).repeat(2, 1)
    mask[0] = 1
    with SparseEngine(any_model, 0.4, layers=LAYERS, mode=mode, selector=selector) as engine:
        b_tokens, b_logits = generate(any_model, batch, mask)
        batch_counts = engine.kept_counts()
        batch_masks = [rt.selection.mask.clone() for rt in engine.runtimes]
        engine.reset_records()
        singles = []
        for b, row in enumerate((long, short)):
            singles.append(generate(any_model, row.unsqueeze(0)))
            for rt, m in zip(engine.runtimes, batch_masks, strict=True):
                assert torch.equal(rt.selection.mask[0], m[b])  # the same neurons
        single_counts = engine.kept_counts()
    assert torch.equal(batch_counts, single_counts)
    for b, (tokens, logits) in enumerate(singles):
        new = b_tokens[b, len(long) :]
        assert torch.equal(new, tokens[0, -len(new) :])
        torch.testing.assert_close(b_logits[b], logits[0], rtol=1e-4, atol=1e-4)


def test_continuation_scoring_runs_the_answer_sparse(any_model):
    """One pass over prompt + continuation equals prefill + sparse decode of the same tokens."""
    prompt_len = PROMPT.shape[1]
    answer = torch.tensor([[44, 12, 200, 9, 31]])
    full = torch.cat([PROMPT, answer], dim=1)
    with torch.no_grad():
        dense = any_model(full).logits
        with SparseEngine(any_model, 0.3, layers=LAYERS) as engine:
            with engine.scoring([prompt_len]):
                scored = any_model(full).logits
            # the same tokens, teacher-forced through the KV cache one step at a time
            out = any_model(PROMPT, use_cache=True)
            cache, steps = out.past_key_values, [out.logits]
            for t in range(answer.shape[1]):
                out = any_model(answer[:, t : t + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                steps.append(out.logits)
    stepped = torch.cat(steps, dim=1)
    assert torch.equal(scored[:, :prompt_len], dense[:, :prompt_len])  # prompt untouched
    assert not torch.allclose(scored[:, prompt_len:], dense[:, prompt_len:])
    torch.testing.assert_close(scored, stepped, rtol=1e-4, atol=1e-4)


def test_scoring_rows_have_their_own_prompt_lengths(llama):
    rows = torch.cat([PROMPT, PROMPT])
    with torch.no_grad(), SparseEngine(llama, 0.3, layers=LAYERS) as engine:
        with engine.scoring([8, 10]):
            both = llama(rows).logits
        with engine.scoring([10]):
            second = llama(rows[1:]).logits
    torch.testing.assert_close(both[1], second[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both[0, 8:10], both[1, 8:10])


def test_per_layer_levels_are_respected(llama):
    n = llama.config.intermediate_size
    levels = [0.1, 0.25, 0.6]
    with SparseEngine(llama, levels, layers="0:3") as engine:
        generate(llama, PROMPT, new=2)
    counts = engine.kept_counts()[0].tolist()
    for level, count in zip(levels, counts, strict=True):
        assert count <= int(level * n)
    assert counts[0] == int(0.1 * n)  # plenty of voted neurons on a SiLU model
    assert engine.layer_density() == pytest.approx([c / n for c in counts])
    assert engine.realized_density() == pytest.approx(sum(counts) / (3 * n))


def test_relu_model_realizes_less_than_its_keep_ratio(opt):
    with SparseEngine(opt, 0.9, layers=LAYERS) as engine:
        generate(opt, PROMPT, new=2)
    assert engine.realized_density() < 0.9


def test_model_is_restored_after_the_block(any_model):
    before = [type(m).__name__ for m in any_model.modules()]
    _, dense_logits = generate(any_model, PROMPT)
    with pytest.raises(RuntimeError, match="boom"):
        with SparseEngine(any_model, 0.2, layers=LAYERS):
            raise RuntimeError("boom")
    assert [type(m).__name__ for m in any_model.modules()] == before
    assert not any_model._forward_pre_hooks and not any_model._forward_hooks
    _, logits = generate(any_model, PROMPT)
    assert torch.equal(logits, dense_logits)


def test_default_layer_range():
    model = tiny_llama(layers=30, hidden=32, neurons=32)
    assert SparseEngine(model, 0.4).layers == list(range(6, 27))
    assert SparseEngine(tiny_opt(layers=5, hidden=32, neurons=32), 0.4).layers == [1, 2, 3]


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.2])
def test_keep_outside_unit_interval_is_refused(llama, keep):
    with pytest.raises(ConfigError, match="outside"):
        SparseEngine(llama, keep, layers=LAYERS)


def test_levels_vector_of_wrong_length_is_refused(llama):
    with pytest.raises(ConfigError, match="3 entries but 2 layers"):
        SparseEngine(llama, [0.4, 0.4, 0.4], layers=LAYERS)


@pytest.mark.parametrize("layers", ["3:9", "2:2", "x:3", "5", "-1:2"])
def test_bad_layer_range_is_refused(llama, layers):
    with pytest.raises(ConfigError, match="layer range"):
        SparseEngine(llama, 0.4, layers=layers)


def test_unsupported_family_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="llama.*opt"):
        SparseEngine(model, 0.4)


def test_decode_without_prefill_is_a_clear_error(llama):
    with torch.no_grad():
        cache = llama(PROMPT, use_cache=True).past_key_values
        with SparseEngine(llama, 0.4, layers=LAYERS), pytest.raises(ConfigError, match="prefill"):
            llama(PROMPT[:, :1], past_key_values=cache, use_cache=True)


def _tiny_family(kind: str):
    import transformers

    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    config_cls, model_cls = {
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    }[kind]
    if kind == "gemma":
        common["head_dim"] = 16
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**common)
    return getattr(transformers, model_cls)(config).eval()


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3", "gemma"])
def test_other_gated_families(kind):
    model = _tiny_family(kind)
    _, dense_logits = generate(model, PROMPT)
    with SparseEngine(model, 1.0, layers="1:2", mode="sliced"):
        _, full = generate(model, PROMPT)
    assert torch.equal(full, dense_logits)
    with SparseEngine(model, 0.3, layers="1:2", mode="masked") as engine:
        m_tokens, m_logits = generate(model, PROMPT)
    with SparseEngine(model, 0.3, layers="1:2", mode="sliced"):
        s_tokens, s_logits = generate(model, PROMPT)
    assert torch.equal(m_tokens, s_tokens)
    torch.testing.assert_close(s_logits, m_logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(m_logits[:, 1:], dense_logits[:, 1:])
    assert 0 < engine.realized_density() <= 0.3
