"""The lean greedy decoder gives model.generate's tokens: dense, masked and sliced,
Llama and OPT, padded batches and single prompts, EOS and stop-string stopping."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tiny_opt, tiny_tokenizer

from autosparse.decoding import lean_greedy, lean_unsupported
from autosparse.engine import SparseEngine
from autosparse.errors import ConfigError
from autosparse.generation import generate, greedy_ids, resolve_decoder
from autosparse.methods import Method

LAYERS = "1:3"
LONG = torch.tensor([5, 17, 42, 99, 7, 3, 18, 64, 120, 33, 11, 90])
SHORT = torch.tensor([8, 21, 77, 4, 150, 63])
NEW = 12

#: (engine settings or None for dense): CoreInfer keep 0.4, and per-layer levels
SETTINGS = {
    "dense": None,
    "masked": {"keep": 0.4, "mode": "masked"},
    "sliced": {"keep": 0.4, "mode": "sliced"},
    "sliced-levels": {"keep": [0.3, 0.6], "mode": "sliced"},
    "masked-levels": {"keep": [0.3, 0.6], "mode": "masked"},
}


def padded_batch(pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LONG and SHORT, left-padded into one batch, and its attention mask."""
    batch = torch.full((2, len(LONG)), pad)
    batch[0] = LONG
    batch[1, -len(SHORT) :] = SHORT
    mask = torch.zeros(2, len(LONG), dtype=torch.long)
    mask[0] = 1
    mask[1, -len(SHORT) :] = 1
    return batch, mask


def hf_greedy(model, ids, mask, new=NEW, eos=False) -> torch.Tensor:
    """The reference: model.generate's greedy tokens after the prompt."""
    extra = {} if eos else {"eos_token_id": None}
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=model.config.pad_token_id,
        **extra,
    )
    return out[:, ids.shape[1] :]


def lean(model, ids, mask, new=NEW, **kw) -> torch.Tensor:
    return lean_greedy(
        model, ids, mask, max_new_tokens=new, pad_token_id=model.config.pad_token_id, **kw
    )


def engine_for(model, setting):
    if setting is None:
        return None
    return SparseEngine(model, setting["keep"], layers=LAYERS, mode=setting["mode"])


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_padded_batch_and_singles_equal_generate(any_model, setting):
    batch, mask = padded_batch(any_model.config.pad_token_id)
    engine = engine_for(any_model, SETTINGS[setting])
    with torch.no_grad(), engine if engine is not None else torch.no_grad():
        reference = hf_greedy(any_model, batch, mask)
        reference_counts = engine.kept_counts() if engine is not None else None
        if engine is not None:
            engine.reset_records()
        got = lean(any_model, batch, mask)
        if engine is not None:
            # selection happened at the prefill alone, once per row, as under generate
            assert torch.equal(engine.kept_counts(), reference_counts)
            assert engine.kept_counts().shape == (2, 2)
        singles = [lean(any_model, row.unsqueeze(0), None) for row in (LONG, SHORT)]
        alone = [hf_greedy(any_model, row.unsqueeze(0), None) for row in (LONG, SHORT)]
    assert got.shape == (2, NEW)
    assert torch.equal(got, reference)
    for b in range(2):
        assert torch.equal(got[b], singles[b][0])
        assert torch.equal(singles[b], alone[b])
    if setting != "dense":  # the sparse decode steps changed something
        dense = lean(any_model, batch, mask)
        assert not torch.equal(dense, got) or SETTINGS[setting]["keep"] == 1.0


def token_at_step_three(tokens: torch.Tensor) -> int:
    """The token greedy decoding emitted at step 3: EOS on it stops the row midway."""
    return int(tokens[min(3, len(tokens) - 1)])


@pytest.mark.parametrize("sliced", [False, True])
def test_eos_stops_each_row_and_pads_it(any_model, sliced):
    batch, mask = padded_batch(any_model.config.pad_token_id)
    engine = engine_for(any_model, SETTINGS["sliced" if sliced else "dense"])
    with torch.no_grad(), engine if engine is not None else torch.no_grad():
        free = lean(any_model, batch, mask)
        eos = token_at_step_three(free[0])
        any_model.generation_config.eos_token_id = eos
        reference = hf_greedy(any_model, batch, mask, eos=True)
        got = lean(any_model, batch, mask, eos_token_id=[eos])
        via_greedy_ids = greedy_ids(
            any_model, batch, mask, max_new_tokens=NEW, pad_token_id=any_model.config.pad_token_id
        )
    assert torch.equal(got, reference) and torch.equal(via_greedy_ids, reference)
    stop = int((free[0] == eos).nonzero()[0])  # row 0's first EOS
    assert got[0, stop] == eos
    assert (got[0, stop + 1 :] == any_model.config.pad_token_id).all()
    if (free[1] == eos).any():
        assert got.shape[1] <= NEW
    else:  # row 1 never meets EOS: the batch runs to the end and row 1 is untouched
        assert got.shape[1] == NEW and torch.equal(got[1], free[1])


def test_batch_ends_when_every_row_has_stopped(llama):
    batch, mask = padded_batch(0)
    with torch.no_grad():
        free = lean(llama, batch, mask)
        eos = [int(free[0, 2]), int(free[1, 4])]
        got = lean(llama, batch, mask, eos_token_id=eos)
        llama.generation_config.eos_token_id = eos
        reference = hf_greedy(llama, batch, mask, eos=True)
    assert torch.equal(got, reference)
    ends = [int(torch.isin(free[b], torch.tensor(eos)).nonzero()[0]) for b in range(2)]
    assert got.shape[1] == max(ends) + 1 < NEW


@pytest.mark.parametrize("setting", ["dense", "masked"])
def test_decoding_records_no_autograd_graph(llama, setting):
    # callers (lm-eval's generate_until among them) do not disable autograd, and the
    # parameters of a model built in memory require gradients: a recorded graph would
    # hold every activation of the prefill until the batch ends
    assert all(p.requires_grad for p in llama.parameters())
    grad_modes = []
    llama.register_forward_pre_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    batch, mask = padded_batch(0)
    engine = engine_for(llama, SETTINGS[setting])
    with torch.enable_grad():
        if engine is None:
            lean(llama, batch, mask)
        else:
            with engine:
                lean(llama, batch, mask)
        assert torch.is_grad_enabled()
    assert grad_modes and not any(grad_modes)


def test_stop_hook_finishes_rows_on_their_own(llama):
    batch, mask = padded_batch(0)
    width = batch.shape[1]
    seen = []

    def stop(sequences: torch.Tensor) -> torch.Tensor:
        seen.append(sequences.shape[1])
        new = sequences.shape[1] - width
        return torch.tensor([new >= 3, new >= 5])  # row 0 after 3 tokens, row 1 after 5

    with torch.no_grad():
        free = lean(llama, batch, mask)
        steps = []
        got = lean(llama, batch, mask, stop=stop, on_token=lambda: steps.append(1))
    assert got.shape == (2, 5) and len(steps) == 5
    assert seen == [width + k for k in range(1, 6)]  # prompt + the tokens so far
    assert torch.equal(got[0, :3], free[0, :3]) and (got[0, 3:] == 0).all()
    assert torch.equal(got[1], free[1, :5])


def test_eager_attention_equals_generate():
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    batch, mask = padded_batch(0)
    with torch.no_grad():
        assert torch.equal(lean(model, batch, mask), hf_greedy(model, batch, mask))


def test_sliding_window_layers_get_the_models_own_masks():
    """Mistral with a window shorter than prompt + generation: one mask over the whole
    cache would be wrong for its layers, so the model builds them from the 2D mask."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = MistralForCausalLM(config).eval()
    batch, mask = padded_batch(0)
    with torch.no_grad(), SparseEngine(model, 0.4, layers=LAYERS, mode="sliced"):
        got = lean(model, batch, mask)
        reference = hf_greedy(model, batch, mask)
        alone = lean(model, SHORT.unsqueeze(0), None)
    assert torch.equal(got, reference) and torch.equal(got[1], alone[0])


def test_generate_reports_the_same_texts_and_densities_with_either_decoder():
    model, tokenizer = tiny_llama(vocab=256), tiny_tokenizer(256)
    prompts = ["where do fish live", "two plus two", "once upon a time there was a cat"]
    method = Method.coreinfer(0.4, layers=LAYERS, mode="sliced")
    runs = {
        d: generate(model, tokenizer, prompts, method, max_new_tokens=8, batch_size=2, decoder=d)
        for d in ("lean", "hf")
    }
    lean_run, hf_run = runs["lean"], runs["hf"]
    assert [g.text for g in lean_run.generations] == [g.text for g in hf_run.generations]
    assert [g.new_tokens for g in lean_run.generations] == [
        g.new_tokens for g in hf_run.generations
    ]
    assert [g.density for g in lean_run.generations] == [g.density for g in hf_run.generations]
    assert lean_run.layer_density == hf_run.layer_density
    assert lean_run.density == pytest.approx(0.4, abs=1 / 128)


def test_a_generation_config_that_changes_greedy_tokens_uses_generate():
    model = tiny_llama()
    assert lean_unsupported(model) is None and resolve_decoder(model) == "lean"
    assert resolve_decoder(model, "hf") == "hf"
    model.generation_config.repetition_penalty = 1.3
    assert "repetition_penalty" in lean_unsupported(model)
    assert resolve_decoder(model, "lean") == "hf"
    batch, mask = padded_batch(0)
    with torch.no_grad():
        got = greedy_ids(model, batch, mask, max_new_tokens=NEW, pad_token_id=0, stop_at_eos=False)
        penalized = hf_greedy(model, batch, mask)
    assert torch.equal(got, penalized)


def test_bad_arguments_are_config_errors(llama):
    with pytest.raises(ConfigError, match="unknown decoder 'fast'"):
        resolve_decoder(llama, "fast")
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 1"):
        lean(llama, LONG.unsqueeze(0), None, new=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [None, "sliced"])
def test_compiled_decode_step_gives_the_same_tokens(mode):
    model = tiny_opt()
    batch, mask = padded_batch(model.config.pad_token_id)
    engine = None if mode is None else SparseEngine(model, 0.4, layers=LAYERS, mode=mode)
    with torch.no_grad(), engine if engine is not None else torch.no_grad():
        eager = lean(model, batch, mask)
        compiled = lean(model, batch, mask, compile=True)
        again = lean(model, batch.flip(0), mask.flip(0), compile=True)
    assert torch.equal(compiled, eager)
    assert torch.equal(again, eager.flip(0))


def _generate_until(decoder: str, contexts, settings, monkeypatch):
    """lm-eval generate_until through SparseLM under CoreInfer sliced; also the number of
    model.generate calls it made."""
    from lm_eval.api.instance import Instance

    from autosparse.tasks.lm import SparseLM

    model, tokenizer = tiny_llama(), tiny_tokenizer()
    lm = SparseLM(model, tokenizer, batch_size=4, max_length=512)
    lm.decoder = decoder
    calls = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(1) or original(*a, **k))
    requests = [
        Instance("generate_until", {}, (c, dict(settings)), i) for i, c in enumerate(contexts)
    ]
    with lm.sparse(Method.coreinfer(0.4, layers=LAYERS, mode="sliced")):
        out = lm.generate_until(requests)
    return out, len(calls), lm.realized_density()


CONTEXTS = ["Question: where do fish live?\nAnswer:", "Two plus two makes", "Once upon a"]


def test_generate_until_greedy_runs_lean_with_the_same_answers(monkeypatch):
    free = {"until": ["<never>"], "do_sample": False, "max_gen_toks": 10}
    lean_out, lean_calls, lean_density = _generate_until("lean", CONTEXTS, free, monkeypatch)
    hf_out, hf_calls, hf_density = _generate_until("hf", CONTEXTS, free, monkeypatch)
    assert lean_calls == 0 and hf_calls == 1
    assert lean_out == hf_out and all(len(t) == 10 for t in lean_out)
    assert lean_density == hf_density
    # stop strings: each row's third character, so rows finish at different steps
    stops = sorted({text[2] for text in lean_out if text[2].strip()})
    until = {"until": stops, "do_sample": False, "max_gen_toks": 10}
    lean_out, _, _ = _generate_until("lean", CONTEXTS, until, monkeypatch)
    hf_out, _, _ = _generate_until("hf", CONTEXTS, until, monkeypatch)
    assert lean_out == hf_out
    assert any(len(t) < 10 for t in lean_out)


def test_generate_until_sampling_uses_generate(monkeypatch):
    torch.manual_seed(0)
    settings = {"until": ["<never>"], "do_sample": True, "temperature": 0.7, "max_gen_toks": 4}
    _, calls, _ = _generate_until("lean", CONTEXTS, settings, monkeypatch)
    assert calls == 1
