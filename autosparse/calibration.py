"""Calibration statistics: one dense pass, stored, reused by every levels setting.

The levels method (docs/method.md, "Sparsity levels") needs, per calibration prompt
and per layer, only three things of the prompt's FFN activations ``A`` (T x N),
padding excluded:

- ``S[i] = sum_t max(A[t, i], 0)``, accumulated in float32;
- ``c[i] = #{t : A[t, i] > 0}``;
- ``T``, the prompt's token count.

``collect_stats`` records them in one dense pass (no sparsity is applied; the model
computes exactly what it computes without us). ``CalibrationStats`` saves and loads
them as safetensors with JSON metadata; ``load_or_collect`` keeps them in a directory
keyed by model, data source, sample ids, texts and layers, so a second or resumed
study reads them back instead of running the model. ``choose_calibration`` picks the
prompts (from a task or a file) and ``calibration_stats`` gets their statistics: every
command goes through these two, so ``tune`` and ``levels`` share statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autosparse.engine.config import layer_range_text
from autosparse.errors import AutosparseError, ConfigError, StorageError
from autosparse.progress import progress_bar
from autosparse.results import package_versions

if TYPE_CHECKING:
    import torch

    from autosparse.engine.config import LayerRange

#: bump when the stored layout or the meaning of a field changes
FORMAT_VERSION = 1
DEFAULT_DIR = Path("studies") / "calibration"
DEFAULT_MAX_TOKENS = 1024


@dataclass(frozen=True, eq=False)
class CalibrationStats:
    """Per-prompt, per-layer positive sums and counts of FFN activations.

    ``S`` (P, L, N) float32 and ``c`` (P, L, N) integer (int16 when every prompt has
    fewer than 32768 tokens, else int32); ``tokens`` (P,) the prompt lengths;
    ``layers`` the L absolute decoder-layer indices, ascending; ``sample_ids`` the P
    document ids (line numbers for a calibration file). ``meta`` is JSON-able: model,
    source, how the prompts were chosen, ``num_layers`` of the model, dtype, versions.
    """

    S: np.ndarray
    c: np.ndarray
    tokens: np.ndarray
    layers: tuple[int, ...]
    sample_ids: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.S.ndim != 3 or self.S.shape != self.c.shape:
            raise StorageError(
                f"calibration statistics are inconsistent: S {self.S.shape}, c {self.c.shape}"
            )
        p, n_layers, _ = self.S.shape
        if self.tokens.shape != (p,) or len(self.sample_ids) != p or len(self.layers) != n_layers:
            raise StorageError(
                f"calibration statistics are inconsistent: {p} prompts and {n_layers} layers, "
                f"but {self.tokens.shape[0]} token counts, {len(self.sample_ids)} sample ids "
                f"and {len(self.layers)} layer indices"
            )

    @property
    def num_prompts(self) -> int:
        return int(self.S.shape[0])

    @property
    def intermediate_size(self) -> int:
        return int(self.S.shape[2])

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model (not only those recorded here)."""
        return int(self.meta.get("num_layers", max(self.layers) + 1))

    def select_layers(self, layers: Sequence[int]) -> CalibrationStats:
        """The statistics of ``layers`` (absolute indices), which must all be recorded."""
        where = {layer: j for j, layer in enumerate(self.layers)}
        missing = [i for i in layers if i not in where]
        if missing:
            raise ConfigError(
                f"calibration statistics cover layers {layer_range_text(self.layers) or list(self.layers)}, not {missing}; "
                "calibrate those layers (or all of them) again"
            )
        pick = [where[i] for i in layers]
        if pick == list(range(len(self.layers))):
            return self
        return replace(
            self, S=self.S[:, pick], c=self.c[:, pick], layers=tuple(int(i) for i in layers)
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file (metadata inside its header); atomic."""
        from safetensors.numpy import save

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "S": np.ascontiguousarray(self.S, dtype=np.float32),
            "c": np.ascontiguousarray(self.c),
            "tokens": np.asarray(self.tokens, dtype=np.int32),
            "layers": np.asarray(self.layers, dtype=np.int32),
            "sample_ids": np.asarray(self.sample_ids, dtype=np.int64),
        }
        header = {"autosparse": json.dumps({"format_version": FORMAT_VERSION, **self.meta})}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(save(tensors, metadata=header))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        """Read a file written by ``save``; StorageError if it is missing or damaged."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="numpy") as f:
                header = f.metadata() or {}
                arrays = {name: f.get_tensor(name) for name in f.keys()}
        except FileNotFoundError:
            raise StorageError(f"no calibration statistics at {path}") from None
        except Exception as exc:  # safetensors raises its own error types
            raise StorageError(f"cannot read calibration statistics {path}: {exc}") from None
        try:
            meta = json.loads(header["autosparse"])
            names = ("S", "c", "tokens", "layers", "sample_ids")
            S, c, tokens, layers, ids = (arrays[n] for n in names)
        except (KeyError, ValueError) as exc:
            raise StorageError(f"{path} is not an autosparse calibration file ({exc})") from None
        if meta.pop("format_version", None) != FORMAT_VERSION:
            raise StorageError(f"{path} was written by another autosparse version; calibrate again")
        return cls(
            S=S,
            c=c,
            tokens=tokens,
            layers=tuple(int(i) for i in layers),
            sample_ids=tuple(int(i) for i in ids),
            meta=meta,
        )


def positive_stats(acts: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence positive sum and count of activations over the valid tokens.

    acts (B, T, N) any float dtype; valid (B, T) bool. Returns S (B, N) float32 and
    c (B, N) int32. Accumulates in float32 whatever the activation dtype.
    """
    import torch

    keep = (acts > 0) & valid.unsqueeze(-1)  # (B, T, N)
    S = torch.where(keep, acts.float(), 0.0).sum(dim=1)  # (B, N) float32
    c = keep.sum(dim=1, dtype=torch.int32)  # (B, N)
    return S, c


def tokenize_prompts(tokenizer, texts: Sequence[str], max_tokens: int | None) -> list[list[int]]:
    """Token ids of each prompt as the tokenizer encodes it alone (special tokens as the
    tokenizer adds them by default), cut to the first ``max_tokens``."""
    out = []
    for i, text in enumerate(texts):
        ids = list(tokenizer(text)["input_ids"])
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if not ids:
            raise ConfigError(f"calibration prompt {i} encodes to no tokens; drop empty prompts")
        out.append(ids)
    return out


def collect_stats(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    layers: LayerRange | str | Sequence[int] | None = None,
    batch_size: int = 8,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    sample_ids: Sequence[int] | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> CalibrationStats:
    """Run ``model`` densely over ``texts`` and record S, c and T per prompt and layer.

    ``layers`` None records every decoder layer (then any sparse range can use the
    file); otherwise a LayerRange, "START:STOP" or a list of indices. Prompts are
    right-padded in batches of ``batch_size`` (longest first) and padding never
    counts; a prompt's statistics do not depend on its batch. The model's outputs are
    not changed: a hook only reads the FFN activations (see the family adapters).
    """
    import torch

    from autosparse.adapters import adapter_for
    from autosparse.engine.config import resolve_layers

    if not texts:
        raise ConfigError("no calibration prompts")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, not {batch_size}")
    if sample_ids is None:
        sample_ids = range(len(texts))
    sample_ids = tuple(int(i) for i in sample_ids)
    if len(sample_ids) != len(texts):
        raise ConfigError(f"{len(texts)} prompts but {len(sample_ids)} sample ids")

    adapter = adapter_for(model)
    decoder = adapter.decoder_layers(model)
    num_layers = len(decoder)
    chosen = list(range(num_layers)) if layers is None else resolve_layers(layers, num_layers)
    chosen = sorted(chosen)
    n_neurons = adapter.intermediate_size(model)
    encoded = tokenize_prompts(tokenizer, texts, max_tokens)
    n_prompts = len(encoded)
    lengths = torch.tensor([len(ids) for ids in encoded], dtype=torch.int32)
    device = next(model.parameters()).device

    S_all = torch.zeros(n_prompts, len(chosen), n_neurons, dtype=torch.float32)
    c_all = torch.zeros(n_prompts, len(chosen), n_neurons, dtype=torch.int32)
    order = sorted(range(n_prompts), key=lambda i: -len(encoded[i]))
    batches = [order[i : i + batch_size] for i in range(0, n_prompts, batch_size)]

    state: dict[str, Any] = {}
    calls = [0] * len(chosen)

    def make_hook(j: int) -> Callable[[torch.Tensor], None]:
        def record(acts: torch.Tensor) -> None:
            rows, valid = state["rows"], state["valid"]
            bsz, seq = valid.shape
            S, c = positive_stats(acts.reshape(bsz, seq, -1), valid)
            S_all[rows, j] = S.cpu()
            c_all[rows, j] = c.cpu()
            calls[j] += 1

        return record

    # The decoder without the LM head: logits are not needed (saves 10-20% of the pass).
    body = getattr(model, "base_model", model)
    removers = []
    was_training = model.training
    started = time.perf_counter()
    try:
        for j, layer_idx in enumerate(chosen):
            removers.append(adapter.capture_activations(decoder[layer_idx], make_hook(j)))
        model.eval()
        with (
            torch.no_grad(),
            progress_bar(progress, "calibrating (dense pass)", n_prompts) as advance,
        ):
            for rows in batches:
                seq = max(len(encoded[i]) for i in rows)
                input_ids = torch.zeros(len(rows), seq, dtype=torch.long)
                valid = torch.zeros(len(rows), seq, dtype=torch.bool)
                for b, i in enumerate(rows):
                    # Right padding: a causal model's real tokens never see the pads
                    # after them, so the pad id does not matter.
                    input_ids[b, : len(encoded[i])] = torch.tensor(encoded[i])
                    valid[b, : len(encoded[i])] = True
                state["rows"] = torch.tensor(rows)
                state["valid"] = valid.to(device)
                before = list(calls)
                body(
                    input_ids=input_ids.to(device),
                    attention_mask=valid.long().to(device),
                    use_cache=False,
                )
                if any(after != b + 1 for after, b in zip(calls, before, strict=True)):
                    raise AutosparseError(
                        "the activation hooks did not run once per layer in a forward pass; "
                        f"is {type(model).__name__} supported by its adapter?"
                    )
                advance(len(rows))
    finally:
        for remove in removers:
            remove()
        model.train(was_training)

    if not torch.isfinite(S_all).all():
        raise AutosparseError(
            "calibration activations overflowed (inf/nan); calibrate in float32 or bfloat16"
        )
    c_dtype = torch.int16 if int(lengths.max()) < 2**15 else torch.int32
    info = {
        "num_layers": num_layers,
        "intermediate_size": n_neurons,
        "model_type": getattr(model.config, "model_type", None),
        "family": adapter.kind,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(device),
        "max_tokens": max_tokens,
        "batch_size": batch_size,
        "seconds": round(time.perf_counter() - started, 3),
        "versions": package_versions(("autosparse", "torch", "transformers")),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return CalibrationStats(
        S=S_all.numpy(),
        c=c_all.to(c_dtype).numpy(),
        tokens=lengths.numpy(),
        layers=tuple(chosen),
        sample_ids=sample_ids,
        meta={**info, **(meta or {})},
    )


# --------------------------------------------------------------------------- the cache


def cache_key(
    *,
    model: str,
    source: str,
    samples: Sequence[tuple[int, str]],
    layers: LayerRange | str | Sequence[int] | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    dtype: str = "auto",
) -> dict[str, Any]:
    """What identifies a calibration: the model identity, the data source (task and how
    prompts were chosen, or a file), the sample ids and a digest of their texts, the
    recorded layers ("all" for None, else the sorted indices), the token cap and the
    requested dtype."""
    texts = hashlib.sha256()
    for _, text in samples:
        texts.update(text.encode())
        texts.update(b"\0")
    layer_key: Any = "all" if layers is None else _layer_list(layers)
    return {
        "format_version": FORMAT_VERSION,
        "model": model,
        "source": source,
        "sample_ids": [int(i) for i, _ in samples],
        "texts_sha256": texts.hexdigest(),
        "layers": layer_key,
        "max_tokens": max_tokens,
        "dtype": dtype,
    }


def _layer_list(layers: LayerRange | str | Sequence[int]) -> list[int]:
    from autosparse.engine.config import LayerRange

    if isinstance(layers, str):
        layers = LayerRange.parse(layers)
    if isinstance(layers, LayerRange):
        layers = range(layers.start, layers.stop)
    return sorted(int(i) for i in layers)


def cache_path(directory: str | os.PathLike, key: dict[str, Any]) -> Path:
    """``<directory>/<model slug>-<16 hex digits of the key's hash>.safetensors``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(key["model"])).strip("_")[:48].strip("_") or "model"
    return Path(directory) / f"{slug}-{digest}.safetensors"


def _covers(entry: dict[str, Any], key: dict[str, Any]) -> bool:
    """Whether a stored calibration (its sidecar ``entry``) answers ``key``: everything
    equal but the layers, and its recorded layers include the requested ones."""
    stored = entry.get("key", {})
    if any(stored.get(k) != v for k, v in key.items() if k != "layers"):
        return False
    have = set(entry.get("layers", ()))
    if key["layers"] == "all":
        return have >= set(range(int(entry.get("num_layers", -1))))
    return have >= set(key["layers"])


def find_cached(directory: str | os.PathLike, key: dict[str, Any]) -> Path | None:
    """The stored statistics answering ``key``: its own file, else any file recorded with
    the same key and a superset of the layers."""
    directory = Path(directory)
    exact = cache_path(directory, key)
    if exact.exists() and exact.with_suffix(".json").exists():
        return exact
    if not directory.is_dir():
        return None
    for sidecar in sorted(directory.glob("*.json")):
        try:
            entry = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        target = sidecar.with_suffix(".safetensors")
        if isinstance(entry, dict) and _covers(entry, key) and target.exists():
            return target
    return None


def store(directory: str | os.PathLike, key: dict[str, Any], stats: CalibrationStats) -> Path:
    """Save ``stats`` under ``key``: the safetensors file, then a JSON sidecar (key,
    layers, metadata) written last, so a sidecar always names a complete file."""
    path = cache_path(directory, key)
    stats.save(path)
    sidecar = {
        "key": key,
        "layers": list(stats.layers),
        "num_layers": stats.num_layers,
        "prompts": stats.num_prompts,
        "intermediate_size": stats.intermediate_size,
        "meta": stats.meta,
    }
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.json.tmp")
    tmp.write_text(json.dumps(sidecar, indent=2))
    os.replace(tmp, path.with_suffix(".json"))
    return path


def load_or_collect(
    directory: str | os.PathLike,
    *,
    model_id: str,
    source: str,
    samples: Sequence[tuple[int, str]],
    load_model: Callable[[], tuple[Any, Any]],
    layers: LayerRange | str | Sequence[int] | None = None,
    batch_size: int = 8,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    dtype: str = "auto",
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[CalibrationStats, bool]:
    """Statistics for ``samples`` (doc id, text) from the cache in ``directory``, or from
    a dense pass with the model that ``load_model()`` returns as (model, tokenizer),
    called only on a miss. Returns (stats, reused). ``source`` names where the prompts
    came from and how they were chosen; it is part of the key and of the metadata.
    A damaged cache file is computed again and replaced."""
    if not samples:
        raise ConfigError("no calibration prompts")
    key = cache_key(
        model=model_id,
        source=source,
        samples=samples,
        layers=layers,
        max_tokens=max_tokens,
        dtype=dtype,
    )
    found = find_cached(directory, key)
    if found is not None:
        try:
            stats = CalibrationStats.load(found)
        except StorageError:
            stats = None
        if stats is not None and stats.sample_ids == tuple(key["sample_ids"]):
            if layers is not None:
                from autosparse.engine.config import resolve_layers

                stats = stats.select_layers(resolve_layers(layers, stats.num_layers))
            return stats, True
    model, tokenizer = load_model()
    stats = collect_stats(
        model,
        tokenizer,
        [text for _, text in samples],
        layers=layers,
        batch_size=batch_size,
        max_tokens=max_tokens,
        sample_ids=[i for i, _ in samples],
        meta={"model": model_id, "source": source, **(meta or {})},
        progress=progress,
    )
    store(directory, key, stats)
    return stats, False


# --------------------------------------------------------------------------- the prompts


@dataclass(frozen=True)
class CalibrationChoice:
    """How calibration prompts are chosen; ``choose_calibration`` turns it into prompts.

    From ``file``: its first ``n`` non-empty lines. From ``task``: by default ``n``
    documents of the evaluation split drawn at random with ``seed``, apart from the
    ``exclude_limit``-document evaluation sample that ``seed`` ``exclude_seed`` gives
    (0: exclude nothing); with ``reference``, the reference's choice: the first ``n``
    documents with their gold answers, which overlap any evaluation.
    """

    task: str | None = None
    n: int = 100
    seed: int = 0
    reference: bool = False
    exclude_limit: int = 0
    exclude_seed: int = 42
    file: str | os.PathLike | None = None
    include_path: tuple[str, ...] = ()


@dataclass(frozen=True)
class CalibrationPrompts:
    """Chosen calibration prompts. ``samples``: (doc id, text) pairs sorted by id (line
    numbers for a file); ``source``: the description of the choice, which is also the
    cache key's source, so equal choices share statistics whichever command made them;
    ``how``: the choice as JSON-able metadata (``selection`` is "file", "reference",
    "random" or "disjoint")."""

    samples: tuple[tuple[int, str], ...]
    source: str
    how: dict[str, Any]

    @property
    def ids(self) -> list[int]:
        return [i for i, _ in self.samples]

    @property
    def exclude_from_evaluation(self) -> bool:
        """Whether a study should keep these documents out of what it evaluates: true for
        a random draw, false for the reference's choice (which overlaps evaluation by
        design) and for a file (its ids are line numbers, not documents)."""
        return self.how["selection"] in ("random", "disjoint")


def choose_calibration(choice: CalibrationChoice) -> CalibrationPrompts:
    """The calibration prompts ``choice`` describes (see CalibrationChoice)."""
    if choice.n < 1:
        raise ConfigError(f"need at least one calibration prompt, not {choice.n}")
    if choice.file:
        if choice.reference:
            raise ConfigError("--reference-calibration draws from --task, not --calibration-file")
        return _file_prompts(choice.file, choice.n)
    if not choice.task:
        raise ConfigError(
            "give --task T (calibration from its documents) or --calibration-file FILE"
        )
    from autosparse.tasks.registry import canonical_name, load_task
    from autosparse.tasks.sampling import calibration_texts, prompt_text, sample_ids

    task = canonical_name(choice.task)
    paths = list(choice.include_path) or None
    if choice.reference:
        _, task_obj = load_task(task, paths)
        docs = task_obj.eval_docs
        first = range(min(choice.n, len(docs)))
        samples = [(i, prompt_text(task_obj, docs[i], True)) for i in first]
        how = {
            "task": choice.task,
            "selection": "reference",
            "with_answers": True,
            "overlaps_evaluation": True,
        }
        source = f"{task}: first {len(samples)} documents + gold answers (reference)"
        return CalibrationPrompts(tuple(samples), source, how)
    excluded: list[int] = []
    if choice.exclude_limit:
        excluded = sample_ids(task, choice.exclude_limit, choice.exclude_seed, include_path=paths)
    samples = calibration_texts(
        task, choice.n, exclude_ids=excluded, seed=choice.seed, include_path=paths
    )
    source = f"{task}: {len(samples)} random documents (seed {choice.seed})"
    if choice.exclude_limit:
        source += (
            f" apart from the {choice.exclude_limit}-document evaluation sample "
            f"(seed {choice.exclude_seed})"
        )
    how = {
        "task": choice.task,
        "selection": "disjoint" if choice.exclude_limit else "random",
        "with_answers": False,
        "excluded_sample": (
            {"limit": choice.exclude_limit, "seed": choice.exclude_seed}
            if choice.exclude_limit
            else None
        ),
        "calibration_seed": choice.seed,
    }
    return CalibrationPrompts(tuple(samples), source, how)


def _file_prompts(file: str | os.PathLike, n: int) -> CalibrationPrompts:
    path = Path(file).resolve()
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {file}: {exc}") from None
    samples = [(i, line) for i, line in enumerate(lines) if line.strip()][:n]
    if not samples:
        raise ConfigError(f"{file} has no non-empty lines")
    how = {"selection": "file", "with_answers": False}
    return CalibrationPrompts(tuple(samples), f"file:{path}", how)


def compute_dtype(dtype: str, device: str = "auto") -> str:
    """The name ("float32", ...) of the dtype a model loaded with ``dtype`` on ``device``
    computes in, resolved as ``load_model`` resolves it. Statistics are keyed by it, so
    "auto" on a CPU and "float32" share them, and "auto" on a GPU does not."""
    from autosparse.models import resolve_device, resolve_dtype

    text = str(dtype).strip().lower().removeprefix("torch.")
    where = resolve_device(device) if text == "auto" else "cpu"
    return str(resolve_dtype(text, where)).removeprefix("torch.")


def calibration_stats(
    prompts: CalibrationPrompts,
    *,
    model_id: str,
    load_model: Callable[[], tuple[Any, Any]],
    dtype: str = "auto",
    device: str = "auto",
    directory: str | os.PathLike = DEFAULT_DIR,
    batch_size: int = 8,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    progress: bool = True,
) -> tuple[CalibrationStats, bool]:
    """Statistics of every decoder layer for ``prompts``, from the cache in ``directory``
    or from a dense pass with the model ``load_model()`` returns (called only on a miss).
    Returns (stats, reused). Every command calibrates through here, so the same prompts,
    model, token cap and compute dtype always find the same statistics; select the
    sparse layers with ``LevelsIndex.from_stats``."""
    return load_or_collect(
        directory,
        model_id=model_id,
        source=prompts.source,
        samples=prompts.samples,
        load_model=load_model,
        layers=None,
        batch_size=batch_size,
        max_tokens=max_tokens,
        dtype=compute_dtype(dtype, device),
        meta=prompts.how,
        progress=progress,
    )
