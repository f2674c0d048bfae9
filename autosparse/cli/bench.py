"""``autosparse bench``: decode speed of dense and a method on the user's model and device."""

from __future__ import annotations

import json

import click

from autosparse.cli.base import (
    batch_size_option,
    build_method,
    load,
    model_options,
    sparsity_options,
)
from autosparse.cli.base import console as make_console
from autosparse.decoding import DECODERS


@click.command("bench")
@model_options
@sparsity_options
@click.option(
    "--prompt-tokens",
    type=int,
    default=256,
    show_default=True,
    help="Length of each synthetic prompt (seeded random token ids; no data needed).",
)
@click.option(
    "--new-tokens",
    type=int,
    default=128,
    show_default=True,
    help="Tokens generated per prompt, exactly (no stop at EOS); at least 2.",
)
@batch_size_option(
    1, "Prompts generated together (decode tokens/s is given per sequence and total)."
)
@click.option(
    "--rounds", type=int, default=5, show_default=True, help="Timed rounds of each configuration."
)
@click.option(
    "--warmup",
    type=int,
    default=1,
    show_default=True,
    help="Untimed rounds before the timed ones, for each configuration.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the synthetic prompts."
)
@click.option(
    "--decoder",
    type=click.Choice(DECODERS),
    default="lean",
    show_default=True,
    help="Decoding path: lean (a static KV cache and one forward call per token) or hf "
    "(transformers' model.generate); both give the same tokens.",
)
@click.option(
    "--compile",
    "compile_step",
    is_flag=True,
    help="torch.compile the lean decoder's step (the first, warm-up round compiles it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def bench_command(
    model,
    device,
    dtype,
    method,
    keep,
    token_ratio,
    levels_file,
    mode,
    layers,
    selector,
    prompt_tokens,
    new_tokens,
    batch_size,
    rounds,
    warmup,
    seed,
    decoder,
    compile_step,
    as_json,
):
    """Time prefill, first token and decode for dense and a method, next to the ideal speedup.

    Dense runs first, then the method, each for --warmup untimed and --rounds timed
    rounds of generating --new-tokens tokens after synthetic prompts of --prompt-tokens,
    through the same decoding path as `autosparse generate` (--decoder hf times
    transformers' model.generate instead, to compare). Times are wall clock at
    torch's default thread count; the ideal decode speedup is the ratio of the weight
    bytes a decode step reads, dense over sparse (docs/performance.md says what is
    counted). Use --mode sliced to see the time sparsity saves.
    """
    from autosparse.bench import BenchSettings

    settings = BenchSettings(
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        batch_size=batch_size,
        rounds=rounds,
        warmup=warmup,
        seed=seed,
        decoder=decoder,
        compile=compile_step,
    )
    chosen = build_method(method, keep, token_ratio, levels_file, mode, layers, selector)
    loaded = load(model, device, dtype)

    from autosparse.bench import run_bench
    from autosparse.progress import progress_bar

    configurations = 1 if chosen.name == "dense" else 2
    total = configurations * (settings.warmup + settings.rounds)
    with progress_bar(not as_json, "timing rounds", total) as advance:
        result = run_bench(
            loaded.model,
            chosen,
            settings,
            tokenizer=loaded.tokenizer,
            on_round=lambda label: advance(1),
        )
    if as_json:
        click.echo(json.dumps({"model": loaded.source, **result.to_dict()}, indent=2))
        return
    _render(loaded.source, result)


def _seconds(spread) -> str:
    if spread is None:
        return "-"
    return f"{spread.median * 1e3:.1f} ms ({spread.low * 1e3:.1f}-{spread.high * 1e3:.1f})"


def _rate(spread) -> str:
    return f"{spread.median:.2f} ({spread.low:.2f}-{spread.high:.2f})"


def _decoder_label(result) -> str:
    if result.decoder == "hf":
        return "model.generate"
    return "lean decoder, compiled" if result.settings.compile else "lean decoder"


def _render(source: str, result) -> None:
    from rich.table import Table

    s = result.settings
    console = make_console()
    table = Table(
        title=(
            f"{source} on {result.device} ({result.dtype}, {result.threads} threads, "
            f"{_decoder_label(result)}): "
            f"batch {s.batch_size}, {s.prompt_tokens}-token prompts, {s.new_tokens} new tokens; "
            f"median (min-max) of {s.rounds} rounds after {s.warmup} warm-up"
        )
    )
    table.add_column("")
    timings = [result.dense] + ([result.sparse] if result.sparse is not None else [])
    for timing in timings:
        table.add_column(timing.label, justify="right")
    if result.sparse is not None:
        table.add_column("vs dense", justify="right")

    def row(name, cell, value) -> None:
        cells = [cell(value(t)) for t in timings]
        if result.sparse is not None:
            dense, sparse = value(result.dense), value(result.sparse)
            ratio = (
                "-" if dense is None or sparse is None else f"{sparse.median / dense.median:.2f}x"
            )
            cells.append(ratio)
        table.add_row(name, *cells)

    row("prefill", _seconds, lambda t: t.prefill)
    row("time to first token", _seconds, lambda t: t.first_token)
    row("decode tokens/s per sequence", _rate, lambda t: t.decode_rate)
    row("decode tokens/s, batch", _rate, lambda t: t.decode_rate_total)
    console.print(table)

    lines = [
        f"weight bytes per decode step: dense {result.dense_bytes / 1e6:.4g} MB, "
        f"sparse {result.sparse_bytes / 1e6:.4g} MB"
    ]
    if result.density is not None:
        lines.append(
            f"realized density {result.density:.3f} over {len(result.layers)} sparse layers "
            f"(planned mean keep {result.method.mean_keep:.3f})"
        )
    lines.append(f"ideal decode speedup {result.ideal_speedup:.2f}x")
    if result.speedup is not None:
        lines.append(
            f"measured decode speedup {result.speedup:.2f}x "
            f"({result.fraction_of_ideal:.0%} of ideal)"
        )
        if result.method.mode == "masked":
            lines.append("masked mode computes every neuron: use --mode sliced to save time")
    for line in lines:
        console.print(line, highlight=False)


COMMANDS = [bench_command]
