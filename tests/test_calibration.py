"""Calibration statistics from the tiny models: a hand computation from captured
activations, batching and padding, the file round trip and the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_llama, tiny_opt, tiny_tokenizer

from autosparse.adapters import adapter_for
from autosparse.calibration import (
    CalibrationStats,
    cache_key,
    collect_stats,
    find_cached,
    load_or_collect,
)
from autosparse.errors import ConfigError, StorageError

TEXTS = [
    "The capital of France is",
    "Q: What is two plus two?\nA:",
    "a",
    "Calibration prompts differ in length, so batches need padding.",
    "Short one.",
]


def hand_stats(model, tokenizer, texts, layers):
    """S and c per prompt from activations captured one prompt at a time, in float64."""
    adapter = adapter_for(model)
    decoder = adapter.decoder_layers(model)
    S, c, tokens = [], [], []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        seen = {}

        def keep(i, seen=seen):
            return lambda act: seen.__setitem__(i, act.clone())

        removers = [adapter.capture_activations(decoder[i], keep(i)) for i in layers]
        try:
            with torch.no_grad():
                model(input_ids=ids)
        finally:
            for remove in removers:
                remove()
        acts = [seen[i].reshape(ids.shape[1], -1).double().numpy() for i in layers]
        S.append([np.where(a > 0, a, 0).sum(axis=0) for a in acts])
        c.append([(a > 0).sum(axis=0) for a in acts])
        tokens.append(ids.shape[1])
    return np.array(S), np.array(c), np.array(tokens)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_stats_match_a_hand_computation(make):
    model, tok = make(), tiny_tokenizer()
    stats = collect_stats(model, tok, TEXTS, batch_size=2, progress=False)
    assert stats.layers == (0, 1, 2, 3)
    assert stats.S.dtype == np.float32 and stats.c.dtype == np.int16
    S, c, tokens = hand_stats(model, tok, TEXTS, stats.layers)
    assert stats.tokens.tolist() == tokens.tolist()
    assert np.array_equal(stats.c, c)
    np.testing.assert_allclose(stats.S, S, rtol=1e-4, atol=1e-6)
    assert (stats.c <= stats.tokens[:, None, None]).all()
    assert stats.meta["num_layers"] == 4 and stats.meta["intermediate_size"] == 128


def test_batching_does_not_change_the_statistics(llama, tokenizer):
    one = collect_stats(llama, tokenizer, TEXTS, layers="1:3", batch_size=1, progress=False)
    many = collect_stats(llama, tokenizer, TEXTS, layers="1:3", batch_size=4, progress=False)
    assert one.layers == many.layers == (1, 2)
    assert np.array_equal(one.c, many.c)
    np.testing.assert_allclose(one.S, many.S, rtol=1e-5, atol=1e-6)


def test_the_pass_leaves_the_model_as_it_was(llama, tokenizer):
    ids = tokenizer("check the logits", return_tensors="pt")["input_ids"]
    llama.train()
    with torch.no_grad():
        before = llama.eval()(input_ids=ids).logits
    llama.train()
    collect_stats(llama, tokenizer, TEXTS[:2], progress=False)
    assert llama.training
    for layer in llama.model.layers:
        assert not layer.mlp.down_proj._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(llama.eval()(input_ids=ids).logits, before)


def test_max_tokens_and_bad_input(llama, tokenizer):
    stats = collect_stats(llama, tokenizer, TEXTS, max_tokens=5, progress=False)
    assert stats.tokens.max() == 5
    with pytest.raises(ConfigError):
        collect_stats(llama, tokenizer, [], progress=False)
    with pytest.raises(ConfigError):
        collect_stats(llama, tokenizer, TEXTS, sample_ids=[1, 2], progress=False)
    with pytest.raises(ConfigError):
        collect_stats(llama, tokenizer, TEXTS, layers="2:9", progress=False)


def test_file_round_trip(tmp_path, opt, tokenizer):
    stats = collect_stats(
        opt, tokenizer, TEXTS, sample_ids=[10, 11, 12, 13, 14], meta={"source": "x"}, progress=False
    )
    path = stats.save(tmp_path / "stats.safetensors")
    back = CalibrationStats.load(path)
    assert np.array_equal(back.S, stats.S) and np.array_equal(back.c, stats.c)
    assert back.c.dtype == stats.c.dtype and np.array_equal(back.tokens, stats.tokens)
    assert back.layers == stats.layers and back.sample_ids == (10, 11, 12, 13, 14)
    assert back.meta == json.loads(json.dumps(stats.meta))
    sub = back.select_layers([1, 2])
    assert sub.layers == (1, 2) and np.array_equal(sub.S, stats.S[:, 1:3])
    with pytest.raises(ConfigError):
        sub.select_layers([0])


def test_damaged_or_missing_files(tmp_path):
    with pytest.raises(StorageError):
        CalibrationStats.load(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(StorageError):
        CalibrationStats.load(bad)


def test_levels_from_collected_stats(llama, tokenizer):
    from autosparse.levels import LevelsIndex, levels_direct

    stats = collect_stats(llama, tokenizer, TEXTS, progress=False)
    index = LevelsIndex.from_stats(stats)  # default range of a 4-layer model: 1:3
    assert index.layers == (1, 2)
    result = index.evaluate(0.45, 0.55, 0.3)
    want = levels_direct(stats.S[:, 1:3], stats.c[:, 1:3], w_sum=0.45, w_count=0.55, threshold=0.3)
    assert list(result.levels) == want.tolist()


class Loader:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.calls = model, tokenizer, 0

    def __call__(self):
        self.calls += 1
        return self.model, self.tokenizer


def test_cache_reuses_statistics_without_the_model(tmp_path, llama, tokenizer):
    samples = list(enumerate(TEXTS))
    loader = Loader(llama, tokenizer)
    common = dict(
        model_id="tiny-llama", source="file:prompts.txt", load_model=loader, progress=False
    )
    first, reused = load_or_collect(tmp_path, samples=samples, **common)
    assert not reused and loader.calls == 1
    assert first.meta["source"] == "file:prompts.txt" and first.meta["model"] == "tiny-llama"
    files = sorted(p.name for p in tmp_path.iterdir())
    assert (
        len(files) == 2 and files[0].startswith("tiny-llama-") and files[1].endswith(".safetensors")
    )

    second, reused = load_or_collect(tmp_path, samples=samples, **common)
    assert reused and loader.calls == 1
    assert np.array_equal(second.S, first.S) and second.sample_ids == first.sample_ids

    # a sub-range is served by the file that recorded every layer
    sub, reused = load_or_collect(tmp_path, samples=samples, layers="1:3", **common)
    assert reused and loader.calls == 1 and sub.layers == (1, 2)

    # other prompts, another source or another model: computed again
    load_or_collect(tmp_path, samples=samples[:3], **common)
    assert loader.calls == 2
    load_or_collect(tmp_path, samples=samples, **{**common, "source": "task:x"})
    assert loader.calls == 3


def test_cache_recomputes_a_damaged_file(tmp_path, llama, tokenizer):
    samples = list(enumerate(TEXTS[:2]))
    loader = Loader(llama, tokenizer)
    common = dict(model_id="m", source="s", load_model=loader, progress=False)
    load_or_collect(tmp_path, samples=samples, **common)
    key = cache_key(model="m", source="s", samples=samples)
    path = find_cached(tmp_path, key)
    path.write_bytes(b"garbage")
    stats, reused = load_or_collect(tmp_path, samples=samples, **common)
    assert not reused and loader.calls == 2 and stats.num_prompts == 2
    assert CalibrationStats.load(path).num_prompts == 2
