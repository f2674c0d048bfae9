"""Greedy decoding without ``model.generate``: one prefill forward call, then one forward
call per new token over a preallocated KV cache (``lean_greedy``).

``model.generate`` rebuilds its inputs every step: the position ids and the 2D attention
mask grow by concatenation, the 4D mask is made again from them, logits processors and
stopping criteria run, and the dynamic KV cache grows by concatenation too. The lean loop
allocates once: a static cache of the prompt plus every new token, the position ids of
every step, and the attention mask of the whole generation, of which each step switches
on one more column. What it computes is what ``generate`` computes for greedy decoding
(``tests/test_decoding.py`` checks the tokens against it), so the sparse engine sees the
same calls: the prefill has an empty cache (selection happens), every later call has a
non-empty one (a decode step).

``compile=True`` runs the decode step through ``torch.compile`` (static shapes; the cache
length is rounded up so batches of similar lengths share a compiled graph). It pays a
long first compilation per shape and is off by default; see docs/performance.md. Where
the model builds its masks itself (sliding-window layers, attention implementations
other than sdpa and eager) the step is not compiled.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from autosparse.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: decoding paths of ``generation.greedy_ids``: this module's loop, or ``model.generate``
DECODERS = ("lean", "hf")

#: generation-config fields that change greedy tokens (logits processors and the like);
#: a model whose generation config sets one of them decodes through ``model.generate``
_PROCESSOR_FIELDS = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "min_length": 0,
    "min_new_tokens": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "watermarking_config": None,
}

#: a cache length is rounded up to a multiple of this when compiling, so that prompts of
#: similar lengths reuse one compiled graph
_COMPILE_BUCKET = 64

_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_decoder(name: str) -> str:
    if name not in DECODERS:
        raise ConfigError(f"unknown decoder {name!r}; choose one of {', '.join(DECODERS)}")
    return name


def lean_unsupported(model) -> str | None:
    """Why ``lean_greedy`` cannot reproduce ``model.generate``'s greedy tokens for this
    model, or None when it can."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    if getattr(model, "_is_stateful", False):
        return "a stateful model (its state is not a KV cache)"
    generation = getattr(model, "generation_config", None)
    for field, neutral in _PROCESSOR_FIELDS.items():
        value = getattr(generation, field, neutral)
        if value is not None and value != neutral:
            return f"its generation config sets {field}={value!r}"
    return None


def eos_ids(model) -> list[int]:
    """The end-of-sequence ids ``model.generate`` stops at (its generation config's)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _without_autograd(fn: Callable) -> Callable:
    """``fn`` run under ``torch.no_grad()`` (torch imported at the call, not here)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return run


@_without_autograd
def lean_greedy(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    pad_token_id: int | None,
    eos_token_id: Sequence[int] = (),
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_token: Callable[[], None] | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Greedy continuation (B, steps) of a left-padded batch ``input_ids`` (B, T) with its
    ``attention_mask`` (1 = token, 0 = padding; None = no padding).

    A row finishes at its first token in ``eos_token_id`` (kept) or once
    ``stop(sequences)`` is true for it, where ``sequences`` (B, T + steps so far) holds
    the prompts and the tokens so far; after that its tokens are ``pad_token_id`` (the
    first id of ``eos_token_id`` when None). The batch ends when every row has finished
    or after ``max_new_tokens`` steps, so ``steps <= max_new_tokens``. ``on_token()`` is
    called after every step, once the step's tokens exist (on the host for a CPU model).
    Each row gets the tokens it would get alone, as with ``model.generate``. Runs without
    autograd, as ``generate`` does (a recorded graph would keep every prefill activation
    alive until the batch ends)."""
    import torch

    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, not {max_new_tokens}")
    batch, width = input_ids.shape
    device = input_ids.device
    eos = torch.tensor(list(eos_token_id), dtype=torch.long, device=device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if len(eos) else 0
    stops = len(eos) > 0 or stop is not None

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    # positions as generate gives them: counted over each row's own tokens, 0 on padding
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    padded = not bool(attention_mask.all())
    length = width + max_new_tokens
    if compile:
        length = -(-length // _COMPILE_BUCKET) * _COMPILE_BUCKET
    cache = _static_cache(model, length)
    # (steps, B, 1): each step's position ids, contiguous
    step_positions = (positions[:, -1:] + torch.arange(1, max_new_tokens, device=device)).T
    step_positions = step_positions.unsqueeze(-1).contiguous()
    allowed = _decode_mask(model, attention_mask, length, cache)

    sequences = torch.full((batch, width + max_new_tokens), pad_token_id, device=device)
    sequences[:, :width] = input_ids
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)

    prefill: dict[str, Any] = {"cache": cache, "use_cache": True}
    with_positions = _accepts(model, "position_ids")
    if with_positions:
        prefill["position_ids"] = positions
    if _accepts(model, "logits_to_keep"):
        prefill["logits_to_keep"] = 1
    # an all-ones mask is dropped, as generate drops it (attention then runs unmasked)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask if padded else None, **prefill
    ).logits[:, -1]
    # a 2D mask grows every step: compiled with static shapes, each step would recompile
    step = _compiled_step(model) if compile and allowed.kind != "2d" else _decode_step
    steps = 0
    while True:
        token = logits.argmax(-1)  # (B,)
        if stops:
            token = torch.where(unfinished, token, pad_token_id)
        sequences[:, width + steps] = token
        steps += 1
        if on_token is not None:
            on_token()
        if len(eos):
            unfinished &= ~torch.isin(token, eos)
        if stop is not None:
            unfinished &= ~stop(sequences[:, : width + steps]).to(device)
        if steps == max_new_tokens or (stops and not bool(unfinished.any())):
            break
        # the token just made sits at cache position width + steps - 1
        allowed.open(width + steps - 1)
        at = step_positions[steps - 1] if with_positions else None
        logits = step(model, token[:, None], at, allowed.mask, cache)
    return sequences[:, width : width + steps]


def _decode_step(model, token, positions, mask, cache) -> torch.Tensor:
    """Logits (B, V) of one new token per row."""
    kwargs = {} if positions is None else {"position_ids": positions}
    out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True, **kwargs)
    return out.logits[:, -1]


def _compiled_step(model) -> Callable:
    import torch

    step = _compiled.get(model)
    if step is None:
        step = _compiled[model] = torch.compile(_decode_step, dynamic=False)
    return step


def _accepts(model, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters


def _static_cache(model, length: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


class _DecodeMask:
    """The attention mask of every decode step, made once: a (B, 1, 1, length) mask over
    the static cache whose prompt columns are the prompt's padding mask and whose later
    columns are switched on one per step (``open``). Passed as a 4D mask, the model uses
    it as given. For attention implementations other than sdpa and eager, or a cache with
    sliding-window layers, it is the 2D mask of the tokens so far and the model builds
    its 4D masks itself."""

    def __init__(self, attention_mask: torch.Tensor, length: int, kind: str, dtype):
        import torch

        batch, width = attention_mask.shape
        self.kind = kind
        if kind == "2d":
            self.full = torch.ones(batch, length, dtype=torch.long, device=attention_mask.device)
            self.full[:, :width] = attention_mask
            self.mask = self.full[:, :width]
            return
        keep = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=attention_mask.device)
        keep[:, 0, 0, :width] = attention_mask.bool()
        if kind == "sdpa":
            self.mask = keep
        else:  # eager: additive, 0 where attended and the dtype's minimum elsewhere
            self.mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
            self.mask.masked_fill_(~keep, torch.finfo(dtype).min)

    def open(self, column: int) -> None:
        """Let every row attend to cache position ``column`` from now on."""
        if self.kind == "2d":
            self.mask = self.full[:, : column + 1]
        elif self.kind == "sdpa":
            self.mask[..., column] = True
        else:
            self.mask[..., column] = 0.0


def _decode_mask(model, attention_mask: torch.Tensor, length: int, cache) -> _DecodeMask:
    implementation = getattr(model.config, "_attn_implementation", None)
    kind = implementation if implementation in ("sdpa", "eager") else "2d"
    # one 4D mask serves every layer only when every layer attends to the whole cache; a
    # sliding-window or linear-attention layer needs the model's own mask for its type
    if any(cache.is_sliding) or any(getattr(cache, "is_linear", [])):
        kind = "2d"
    dtype = next(model.parameters()).dtype
    return _DecodeMask(attention_mask, length, kind, dtype)
