"""Column-major storage of the wide linear layers: same values, same tokens, sliced gathers
bit-identical, tied weights still tied, reversible, and applied by load_model on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tiny_opt, tiny_tokenizer

from autosparse.engine import SparseEngine
from autosparse.layout import (
    column_major_wide,
    default_layout,
    is_column_major,
    weight_layout,
    wide_linears,
)
from autosparse.models import load_model

PROMPT = torch.tensor([[5, 17, 42, 99, 7, 3, 18, 64, 120, 33, 11, 90]])


def clone_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def greedy(model, new=10):
    out = model.generate(
        input_ids=PROMPT,
        attention_mask=torch.ones_like(PROMPT),
        max_new_tokens=new,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=model.config.pad_token_id,
    )
    return out[:, PROMPT.shape[1] :]


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_wide_layers_become_column_major_with_the_same_values(make):
    model = make()
    before = clone_state(model)
    wide = wide_linears(model)
    # the FFN's gate/up (fc1) of every layer and the lm_head (vocabulary 256 > hidden 64)
    assert len(wide) == 2 * 4 + 1 if make is tiny_llama else 4 + 1
    assert all(m.out_features > m.in_features for m in wide)
    moved = column_major_wide(model)
    assert moved == len(wide)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            assert is_column_major(module.weight) == (module in wide)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert column_major_wide(model) == 0  # already there


def test_tied_embedding_stays_tied():
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    column_major_wide(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert is_column_major(model.lm_head.weight)  # vocabulary 256 > hidden
    # and the embedding still looks rows up from it
    with torch.no_grad():
        rows = model.model.embed_tokens(PROMPT)
    assert torch.equal(rows[0], model.lm_head.weight[PROMPT[0]])


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_dense_tokens_and_logits_match_the_row_major_model(make):
    model = make()
    with torch.no_grad():
        ref_logits = model(PROMPT).logits
        ref = greedy(model)
        with weight_layout(model, "column-wide") as moved:
            assert moved > 0
            logits = model(PROMPT).logits
            got = greedy(model)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_sliced_gathers_are_bit_identical_from_either_layout(make):
    """The sliced engine gathers the kept rows of gate/up (fc1) from a column-major weight
    along its contiguous dimension: the gathered matrices are the same numbers."""
    model = make()
    gathered = {}
    for layout in ("row", "column-wide"):
        with torch.no_grad(), weight_layout(model, layout):
            with SparseEngine(model, 0.4, layers="1:3", mode="sliced") as engine:
                model(PROMPT)
                gathered[layout] = {
                    (index, key): value.clone()
                    for index, runtime in enumerate(engine.runtimes)
                    for key, value in runtime.sliced.items()
                }
    assert gathered["row"].keys() == gathered["column-wide"].keys()
    assert gathered["row"]
    for key, value in gathered["row"].items():
        assert torch.equal(value, gathered["column-wide"][key]), key


@pytest.mark.parametrize("mode", ["masked", "sliced"])
def test_sparse_tokens_match_the_row_major_model(mode):
    model = tiny_llama()
    tokens = {}
    for layout in ("row", "column-wide"):
        with torch.no_grad(), weight_layout(model, layout):
            with SparseEngine(model, 0.4, layers="1:3", mode=mode):
                tokens[layout] = greedy(model)
    assert torch.equal(tokens["row"], tokens["column-wide"])


def test_weight_layout_restores_and_rejects_unknown_layouts():
    model = tiny_llama()
    with weight_layout(model, "column-wide"):
        assert all(is_column_major(m.weight) for m in wide_linears(model))
        with weight_layout(model, "row") as moved:
            assert moved == len(wide_linears(model))
            assert not any(is_column_major(m.weight) for m in wide_linears(model))
        assert all(is_column_major(m.weight) for m in wide_linears(model))
    assert all(m.weight.is_contiguous() for m in wide_linears(model))
    with pytest.raises(ValueError, match="layout must be one of"):
        with weight_layout(model, "diagonal"):
            pass


def test_default_layout_is_column_wide_for_float32_on_the_cpu_only():
    assert default_layout("cpu", torch.float32) == "column-wide"
    assert default_layout("cpu", torch.bfloat16) == "row"
    assert default_layout("cuda", torch.float32) == "row"


@pytest.mark.parametrize("dtype,column", [("float32", True), ("bfloat16", False)])
def test_load_model_stores_wide_layers_by_the_default_layout(tmp_path, dtype, column):
    folder = tmp_path / "llama"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    loaded = load_model(str(folder), device="cpu", dtype=dtype)
    wide = wide_linears(loaded.model)
    assert wide
    assert all(is_column_major(m.weight) == column for m in wide)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_sliced_decode_on_a_column_major_model_multiplies_column_major_and_matches(make):
    """A two-sequence batch (the bmm path) and one sequence (the linear path), with gate/up
    (fc1) gathered column-major: the tokens of the row-major model."""
    model = make()
    batch = torch.stack([PROMPT[0], PROMPT[0].flip(0)])
    key = "gate_up" if make is tiny_llama else "fc1"
    tokens = {}
    for layout in ("row", "column-wide"):
        with torch.no_grad(), weight_layout(model, layout):
            with SparseEngine(model, 0.4, layers="1:3", mode="sliced") as engine:
                for name, ids in (("batch", batch), ("single", batch[1:])):
                    out = model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=8,
                        do_sample=False,
                        eos_token_id=None,
                        pad_token_id=model.config.pad_token_id,
                    )
                    tokens[layout, name] = out[:, ids.shape[1] :]
                    gathered = engine.runtimes[0].sliced[key]
                    assert all(is_column_major(g) == (layout == "column-wide") for g in gathered)
    assert torch.equal(tokens["row", "batch"], tokens["column-wide", "batch"])
    assert torch.equal(tokens["row", "single"], tokens["column-wide", "single"])
    assert torch.equal(tokens["column-wide", "single"], tokens["column-wide", "batch"][1:])
