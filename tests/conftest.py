"""Shared fixtures: tiny randomly initialised models built from a config (no downloads)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama(
    layers: int = 4, hidden: int = 64, neurons: int = 128, vocab: int = 256, seed: int = 0
):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=neurons,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_opt(
    layers: int = 4, hidden: int = 64, neurons: int = 128, vocab: int = 256, seed: int = 0
):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        ffn_dim=neurons,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=hidden,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        dropout=0.0,
    )
    model = OPTForCausalLM(cfg).eval()
    # Random init gives fc1 biases of 0: shift them so ReLU zeros some neurons per token
    # and the realized density can fall below the keep ratio, as on real OPT models.
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.fc1.bias.normal_(-0.05, 0.05)
    return model


def tiny_tokenizer(vocab: int = 256):
    """A real fast tokenizer with a byte-level vocabulary built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_map = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for i in range(vocab - 3):
        vocab_map[chr(0x20 + i)] = i + 3
    tok = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<pad>",
    )
    return fast


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def opt():
    return tiny_opt()


@pytest.fixture(params=["llama", "opt"])
def any_model(request):
    return tiny_llama() if request.param == "llama" else tiny_opt()


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()
