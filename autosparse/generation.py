"""Text generation under a sparsity method (the library side of ``autosparse generate``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autosparse.methods import Method

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Generation:
    prompt: str
    text: str
    new_tokens: int
    density: float | None  # realized kept fraction over the sparse layers (None for dense)


@dataclass(frozen=True)
class GenerationRun:
    method: Method
    layers: list[int]  # absolute indices of the sparse layers ([] for dense)
    layer_density: list[float]  # mean kept fraction per sparse layer
    generations: list[Generation]
    seconds: float

    @property
    def density(self) -> float | None:
        values = [g.density for g in self.generations if g.density is not None]
        return sum(values) / len(values) if values else None


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    method: Method,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    decoder: str = "lean",
    compile: bool = False,
) -> GenerationRun:
    """Greedy generation for every prompt, in left-padded batches. Selection happens at
    each batch's prefill and is per sequence, so batching does not change the outputs.
    ``decoder``: the decoding path (``greedy_ids``); both give the same tokens.
    ``compile``: ``torch.compile`` the lean decoder's step (same tokens; the first batch
    of a new shape pays the compilation)."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    generations: list[Generation] = []
    start = time.perf_counter()
    with method.apply(model) as engine, torch.no_grad():
        for first in range(0, len(prompts), batch_size):
            chunk = list(prompts[first : first + batch_size])
            batch = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            seen = engine.kept_counts().shape[0] if engine is not None else 0
            new = greedy_ids(
                model,
                batch["input_ids"],
                batch.get("attention_mask"),
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                decoder=decoder,
                compile=compile,
            )
            densities = engine.sequence_density()[seen:].tolist() if engine is not None else None
            for i, prompt in enumerate(chunk):
                tokens = new[i]
                count = int((tokens != tokenizer.pad_token_id).sum())
                generations.append(
                    Generation(
                        prompt=prompt,
                        text=tokenizer.decode(tokens, skip_special_tokens=True),
                        new_tokens=count,
                        density=None if densities is None else densities[i],
                    )
                )
            if on_batch is not None:
                on_batch(len(chunk))
        layers = list(engine.layers) if engine is not None else []
        layer_density = engine.layer_density() if engine is not None else []
    return GenerationRun(method, layers, layer_density, generations, time.perf_counter() - start)


class _StepStreamer:
    """The streamer interface of ``model.generate``: ``put`` gets the prompt once, then
    each step's new tokens (already on the host); ``end`` comes after the last step."""

    def __init__(self, on_token: Callable[[], None]):
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.on_token()
        self.prompt_seen = True

    def end(self) -> None:
        pass


def resolve_decoder(model, decoder: str = "lean") -> str:
    """The decoding path ``greedy_ids`` takes for ``decoder`` on this model: "lean"
    (``autosparse.decoding.lean_greedy``) unless the model needs ``model.generate`` to get
    the same tokens (``decoding.lean_unsupported``), or "hf" when asked for."""
    from autosparse.decoding import check_decoder, lean_unsupported

    if check_decoder(decoder) == "lean" and lean_unsupported(model) is None:
        return "lean"
    return "hf"


def greedy_ids(
    model,
    input_ids,
    attention_mask,
    *,
    max_new_tokens: int,
    pad_token_id: int | None,
    stop_at_eos: bool = True,
    on_token: Callable[[], None] | None = None,
    decoder: str = "lean",
    compile: bool = False,
) -> torch.Tensor:
    """Greedy continuation (B, new tokens) of a left-padded batch; rows that stop early
    are padded with ``pad_token_id``. This is the decoding path of ``generate`` and of
    ``autosparse bench``, so bench times what generate runs. ``stop_at_eos=False`` runs
    exactly ``max_new_tokens`` steps; ``on_token()`` is called after every step, once the
    step's tokens are on the host. ``decoder`` "lean" runs ``decoding.lean_greedy`` (where
    ``resolve_decoder`` allows it; ``compile`` applies to it), "hf" ``model.generate``:
    both give the same tokens."""
    if resolve_decoder(model, decoder) == "lean":
        from autosparse.decoding import eos_ids, lean_greedy

        return lean_greedy(
            model,
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            eos_token_id=eos_ids(model) if stop_at_eos else (),
            on_token=on_token,
            compile=compile,
        )
    extra = {} if stop_at_eos else {"eos_token_id": None}
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
        streamer=None if on_token is None else _StepStreamer(on_token),
        **extra,
    )
    return out[:, input_ids.shape[1] :]
