"""Dense references: the dense model's greedy continuation of each prompt, with its
top-k next-token log-probabilities from a teacher-forced pass (``results.Reference``)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from autosparse.errors import TaskError
from autosparse.fidelity.scoring import score_batch
from autosparse.progress import progress_bar
from autosparse.results import Reference

#: bump when the meaning of a stored reference changes
REFERENCE_VERSION = 1


def prompt_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def eos_ids(model, tokenizer) -> set[int]:
    """Every token id that ends a generation: the tokenizer's and the model's."""
    out = set()
    if tokenizer.eos_token_id is not None:
        out.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        out.add(eos)
    elif isinstance(eos, (list, tuple)):
        out.update(int(e) for e in eos)
    return out


def generate_references(
    model,
    tokenizer,
    texts: Mapping[int, str],
    *,
    max_new_tokens: int,
    min_new_tokens: int,
    top_k: int,
    batch_size: int,
    progress: bool = False,
) -> dict[int, Reference]:
    """The references of prompts ``texts`` ({doc id: prompt}): one greedy ``generate``
    call per batch of ``batch_size`` prompts (of similar lengths), then the same
    teacher-forced dense pass a trial makes, so keep 1.0 reproduces the stored
    distributions."""
    import torch

    tok = tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    device = next(model.parameters()).device
    eos = eos_ids(model, tok)
    ids = sorted(texts, key=lambda i: (len(texts[i]), i))
    out: dict[int, Reference] = {}
    with progress_bar(progress, "generating dense references", len(ids)) as advance:
        for first in range(0, len(ids), batch_size):
            chunk = ids[first : first + batch_size]
            prompts = [list(tok(texts[i])["input_ids"]) for i in chunk]
            if min(len(p) for p in prompts) < 1:
                raise TaskError("a prompt tokenizes to nothing")
            # left-padded generation, as generation.generate does
            width = max(len(p) for p in prompts)
            batch = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for b, p in enumerate(prompts):
                batch[b, width - len(p) :] = torch.tensor(p)
                mask[b, width - len(p) :] = 1
            # the batch is padded here, so the tokenizer's padding side plays no part
            with torch.no_grad():
                gen = model.generate(
                    input_ids=batch.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=min_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=tok.pad_token_id,
                )
            conts = []
            for row in gen[:, width:].tolist():
                cont = []
                for t in row:
                    cont.append(int(t))
                    if t in eos:
                        break
                conts.append(cont or [int(tok.eos_token_id or 0)])
            with torch.no_grad():
                means, tops, _ = score_batch(
                    model, list(zip(prompts, conts, strict=True)), None, top_k=top_k
                )
            for i, p, c, m, (top_ids, top_lp) in zip(
                chunk, prompts, conts, means, tops, strict=True
            ):
                out[i] = Reference(
                    doc_id=i,
                    prompt_sha=prompt_sha(texts[i]),
                    prompt_ids=tuple(p),
                    continuation=tuple(c),
                    top_ids=top_ids.astype(np.int64),
                    top_logprobs=top_lp.astype(np.float32),
                    dense_fidelity=m,
                )
            advance(len(chunk))
    return out
