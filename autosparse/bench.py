"""Decode speed of a method on a user's model (the library side of ``autosparse bench``).

``run_bench`` times dense generation and then the method's on the same synthetic prompts:
prefill, time to first token and decode tokens/s, over several rounds after warm-up
rounds, through the same decoding path as ``autosparse generate`` (``greedy_ids``; its
lean decoder by default, ``model.generate`` with ``decoder="hf"``, to compare). It
reports the realized density the engine recorded and the ideal decode speedup from the
bytes a decode step reads (``decode_step_bytes``), so a user sees how much of the ideal
their device and settings reach.

Timing is wall clock at torch's current thread count (reported), with the device
synchronized before every clock reading on CUDA and MPS. torch is imported inside the
functions.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autosparse.errors import ConfigError
from autosparse.methods import Method

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class BenchSettings:
    """What one bench run measures. Every count is validated here, before a model loads."""

    prompt_tokens: int = 256
    new_tokens: int = 128
    batch_size: int = 1
    rounds: int = 5
    warmup: int = 1
    seed: int = 0
    decoder: str = "lean"  # generation.greedy_ids's decoding path: "lean" or "hf"
    compile: bool = False  # torch.compile the lean decoder's step

    def __post_init__(self) -> None:
        from autosparse.decoding import check_decoder

        check_decoder(self.decoder)
        if self.compile and self.decoder != "lean":
            raise ConfigError("--compile applies to the lean decoder only (--decoder lean)")
        checks = [
            ("--prompt-tokens", self.prompt_tokens, 1),
            # decode speed is timed from the first new token to the last: it needs two
            ("--new-tokens", self.new_tokens, 2),
            ("--batch-size", self.batch_size, 1),
            ("--rounds", self.rounds, 1),
            ("--warmup", self.warmup, 0),
        ]
        for option, value, least in checks:
            if not isinstance(value, int) or value < least:
                raise ConfigError(f"{option} must be an integer >= {least}, not {value!r}")


@dataclass(frozen=True)
class Spread:
    """One quantity over the measured rounds: median, range and quartiles."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    @property
    def quartiles(self) -> tuple[float, float]:
        if len(self.values) < 2:
            return self.values[0], self.values[0]
        q1, _, q3 = statistics.quantiles(self.values, n=4, method="inclusive")
        return q1, q3

    def to_dict(self) -> dict[str, Any]:
        q1, q3 = self.quartiles
        return {
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "q1": q1,
            "q3": q3,
            "rounds": list(self.values),
        }


@dataclass(frozen=True)
class Round:
    """One timed generation of the batch. ``prefill`` is None when the decoding path ran
    no forward call of the model object (a path that bypasses its hooks)."""

    prefill: float | None  # seconds of the first forward call (the prompt)
    first_token: float  # seconds from the call to the first new tokens on the host
    decode: float  # seconds from the first new tokens to the last


@dataclass(frozen=True)
class Timing:
    """Dense's or the method's rounds."""

    label: str
    rounds: tuple[Round, ...]
    new_tokens: int
    batch_size: int

    @property
    def prefill(self) -> Spread | None:
        values = [r.prefill for r in self.rounds]
        return None if None in values else Spread(tuple(values))

    @property
    def first_token(self) -> Spread:
        return Spread(tuple(r.first_token for r in self.rounds))

    @property
    def decode_rate(self) -> Spread:
        """Decode tokens per second of one sequence (the first token excluded: it is the
        prefill's)."""
        return Spread(tuple((self.new_tokens - 1) / r.decode for r in self.rounds))

    @property
    def decode_rate_total(self) -> Spread:
        """Decode tokens per second of the whole batch."""
        return Spread(tuple(self.batch_size * v for v in self.decode_rate.values))

    def to_dict(self) -> dict[str, Any]:
        prefill = self.prefill
        return {
            "label": self.label,
            "prefill_seconds": None if prefill is None else prefill.to_dict(),
            "time_to_first_token_seconds": self.first_token.to_dict(),
            "decode_tokens_per_second": self.decode_rate.to_dict(),
            "decode_tokens_per_second_total": self.decode_rate_total.to_dict(),
        }


@dataclass(frozen=True)
class BenchResult:
    settings: BenchSettings
    method: Method
    device: str
    dtype: str
    threads: int  # torch's intra-op threads during the run
    dense: Timing
    sparse: Timing | None  # None when the method is dense
    layers: list[int]  # absolute indices of the sparse layers ([] for dense)
    layer_density: list[float]  # realized kept fraction per sparse layer
    density: float | None  # realized kept fraction over the sparse layers (None for dense)
    dense_bytes: int  # weight bytes a decode step of the batch reads, dense
    sparse_bytes: int  # the same under the method's realized kept fractions
    decoder: str = "lean"  # the decoding path that ran (greedy_ids's, resolved for the model)

    @property
    def ideal_speedup(self) -> float:
        """Decode speedup if time were proportional to the weight bytes read."""
        return self.dense_bytes / self.sparse_bytes

    @property
    def speedup(self) -> float | None:
        """Measured decode speedup: median tokens/s of the method over dense's."""
        if self.sparse is None:
            return None
        return self.sparse.decode_rate.median / self.dense.decode_rate.median

    @property
    def fraction_of_ideal(self) -> float | None:
        speedup = self.speedup
        return None if speedup is None else speedup / self.ideal_speedup

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; the field names are stable."""
        s = self.settings
        return {
            "device": self.device,
            "dtype": self.dtype,
            "threads": self.threads,
            "prompt_tokens": s.prompt_tokens,
            "new_tokens": s.new_tokens,
            "batch_size": s.batch_size,
            "rounds": s.rounds,
            "warmup": s.warmup,
            "seed": s.seed,
            "decoder": self.decoder,
            "compile": s.compile and self.decoder == "lean",
            "method": self.method.to_dict(),
            "layers": self.layers,
            "layer_density": self.layer_density,
            "realized_density": self.density,
            "decode_bytes": {"dense": self.dense_bytes, "sparse": self.sparse_bytes},
            "ideal_decode_speedup": self.ideal_speedup,
            "decode_speedup": self.speedup,
            "fraction_of_ideal": self.fraction_of_ideal,
            "dense": self.dense.to_dict(),
            "sparse": None if self.sparse is None else self.sparse.to_dict(),
        }


# -- bytes a decode step reads ------------------------------------------------------


def decode_step_bytes(
    model, kept_fraction: Mapping[int, float] | None = None, batch_size: int = 1
) -> int:
    """Weight bytes one decode step of ``batch_size`` sequences reads, from the model's
    parameter shapes and dtypes. Pure: the model is only inspected (a model on the meta
    device works).

    Counted: every parameter once (attention, norms, the lm_head, the MLPs of dense
    layers), except that an embedding table the lm_head does not share is read one row
    per sequence, and that on each layer of ``kept_fraction`` (absolute layer index ->
    mean kept fraction of its FFN neurons per sequence) with a fraction below 1 each
    sequence reads its own kept neurons' weights (gate/up rows, down columns and their
    biases; fc1 rows and bias and fc2 columns for OPT) while the FFN's output bias is read
    once. A layer keeping every neuron runs the original MLP, read once for the batch.
    Not counted: the KV cache, buffers (rotary tables), activations.
    """
    from torch import nn

    from autosparse.adapters import adapter_for
    from autosparse.adapters.base import tensor_bytes

    total = sum(tensor_bytes(p) for p in model.parameters())  # shared tensors once
    output = model.get_output_embeddings()
    head = None if output is None else output.weight
    seen: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Embedding) or weight is head or id(weight) in seen:
            continue
        seen.add(id(weight))
        row = weight.shape[1] * weight.element_size()
        total -= tensor_bytes(weight) - batch_size * row
    if kept_fraction:
        adapter = adapter_for(model)
        layers = adapter.decoder_layers(model)
        for index, fraction in kept_fraction.items():
            if not 0.0 <= fraction <= 1.0:
                raise ConfigError(f"kept fraction {fraction} of layer {index} is outside [0, 1]")
            if fraction >= 1.0:
                continue
            per_neuron, _ = adapter.ffn_neuron_bytes(layers[index])
            total -= per_neuron
            total += round(batch_size * fraction * per_neuron)
    return int(total)


# -- prompts --------------------------------------------------------------------------


def synthetic_prompt_ids(
    vocab_size: int, batch_size: int, length: int, seed: int, exclude: Sequence[int] = ()
) -> torch.Tensor:
    """(batch_size, length) token ids drawn uniformly from ``range(vocab_size)`` minus
    ``exclude`` (special tokens), from a generator seeded with ``seed``: the same ids on
    every machine and run, and no data needed."""
    import torch

    banned = torch.tensor(sorted(set(exclude)), dtype=torch.long)
    allowed = torch.arange(vocab_size, dtype=torch.long)
    allowed = allowed[~torch.isin(allowed, banned)]
    if not len(allowed):
        raise ConfigError("no token ids left for synthetic prompts")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(allowed), (batch_size, length), generator=generator)
    return allowed[picks]


# -- timing ---------------------------------------------------------------------------


def _clock(device: torch.device) -> Callable[[], float]:
    """Wall clock that first waits for the device's queued work (CUDA and MPS run
    asynchronously: without this a clock reading would time the launches only)."""
    import torch

    if device.type == "cuda":

        def sync_clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return sync_clock
    if device.type == "mps":

        def mps_clock() -> float:
            torch.mps.synchronize()
            return time.perf_counter()

        return mps_clock
    return time.perf_counter


def time_generation(
    model,
    input_ids: torch.Tensor,
    *,
    new_tokens: int,
    pad_token_id: int | None,
    decoder: str = "lean",
    compile: bool = False,
) -> Round:
    """Generate exactly ``new_tokens`` greedy tokens for the (unpadded) batch ``input_ids``
    through ``greedy_ids`` (with ``decoder`` and ``compile``) and time its phases."""
    import torch

    from autosparse.generation import greedy_ids

    clock = _clock(input_ids.device)
    marks: dict[str, float] = {}
    steps: list[float] = []

    def before(module, args, kwargs):
        marks.setdefault("prefill_start", clock())

    def after(module, args, output):
        marks.setdefault("prefill_end", clock())
        # the prefill is timed: decode steps run without these hooks (a compiled step
        # would otherwise break its graph at them)
        for handle in handles:
            handle.remove()

    # prepend: the prefill's time includes the sparse engine's own pre-forward hook
    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
        model.register_forward_hook(after),
    ]
    mask = torch.ones_like(input_ids)
    try:
        start = clock()
        greedy_ids(
            model,
            input_ids,
            mask,
            max_new_tokens=new_tokens,
            pad_token_id=pad_token_id,
            stop_at_eos=False,
            on_token=lambda: steps.append(clock()),
            decoder=decoder,
            compile=compile,
        )
    finally:
        for handle in handles:
            handle.remove()
    if len(steps) != new_tokens:
        raise ConfigError(
            f"generation produced {len(steps)} tokens, not the {new_tokens} asked for; "
            "the model's generation settings stop it early"
        )
    prefill = None
    if "prefill_end" in marks:
        prefill = marks["prefill_end"] - marks["prefill_start"]
    return Round(prefill=prefill, first_token=steps[0] - start, decode=steps[-1] - steps[0])


def _check_fits(model, settings: BenchSettings) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    length = settings.prompt_tokens + settings.new_tokens
    if isinstance(limit, int) and length > limit:
        raise ConfigError(
            f"--prompt-tokens + --new-tokens = {length} exceeds the model's "
            f"{limit} positions; ask for fewer tokens"
        )


def _check_method(model, method: Method) -> None:
    """Fail on a method that does not fit the model (layer range, levels length) before
    any timing, rather than after the dense rounds."""
    if method.name == "dense":
        return
    from autosparse.adapters import adapter_for
    from autosparse.engine import resolve_keep, resolve_layers

    layers = resolve_layers(method.layers, adapter_for(model).num_layers(model))
    resolve_keep(method.keep, len(layers))


def run_bench(
    model,
    method: Method,
    settings: BenchSettings,
    *,
    tokenizer=None,
    on_round: Callable[[str], None] | None = None,
) -> BenchResult:
    """Time dense generation, then ``method``'s, on ``settings.batch_size`` synthetic
    prompts; ``settings.warmup`` rounds of each are run first and dropped. Dense runs
    first and the method second (not interleaved): the method's engine stays applied
    across its rounds, so its rounds are the steady state of an engine serving many
    batches, as in ``autosparse generate``. ``tokenizer`` (optional) only narrows the
    prompt ids to its vocabulary without special tokens. ``on_round(label)`` is called
    after every round, warm-up included."""
    import torch

    _check_fits(model, settings)
    _check_method(model, method)
    param = next(model.parameters())
    vocab = int(model.config.vocab_size)
    exclude: list[int] = []
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer))
        exclude = list(tokenizer.all_special_ids)
    ids = synthetic_prompt_ids(
        vocab, settings.batch_size, settings.prompt_tokens, settings.seed, exclude
    ).to(param.device)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    from autosparse.generation import resolve_decoder

    decoder = resolve_decoder(model, settings.decoder)

    def measure(label: str, after_warmup: Callable[[], None] = lambda: None) -> Timing:
        rounds = []
        for index in range(settings.warmup + settings.rounds):
            if index == settings.warmup:
                after_warmup()
            got = time_generation(
                model,
                ids,
                new_tokens=settings.new_tokens,
                pad_token_id=pad,
                decoder=decoder,
                compile=settings.compile and decoder == "lean",
            )
            if index >= settings.warmup:
                rounds.append(got)
            if on_round is not None:
                on_round(label)
        return Timing(label, tuple(rounds), settings.new_tokens, settings.batch_size)

    with torch.no_grad():
        dense = measure("dense")
        sparse, layers, layer_density, density = None, [], [], None
        if method.name != "dense":
            with method.apply(model) as engine:
                sparse = measure(f"{method.label()} {method.mode}", engine.reset_records)
                layers = list(engine.layers)
                layer_density = engine.layer_density()
                density = engine.realized_density()
    kept = dict(zip(layers, layer_density, strict=True))
    return BenchResult(
        settings=settings,
        method=method,
        device=str(param.device),
        dtype=str(param.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        dense=dense,
        sparse=sparse,
        layers=layers,
        layer_density=layer_density,
        density=density,
        dense_bytes=decode_step_bytes(model, None, settings.batch_size),
        sparse_bytes=decode_step_bytes(model, kept, settings.batch_size),
        decoder=decoder,
    )
