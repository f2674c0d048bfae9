"""``autosparse generate``: sparse generation with the realized density per layer."""

from __future__ import annotations

import json
from pathlib import Path

import click

from autosparse.cli.base import (
    batch_size_option,
    build_method,
    load,
    model_options,
    sparsity_options,
)
from autosparse.cli.base import console as make_console


@click.command("generate")
@model_options
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable).")
@click.option(
    "--prompts-file",
    type=click.Path(exists=True, dir_okay=False),
    help="A text file with one prompt per line.",
)
@sparsity_options
@click.option(
    "--max-new-tokens",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="Tokens to generate per prompt.",
)
@batch_size_option(8, "Prompts per left-padded batch.")
@click.option(
    "--compile",
    "compile_step",
    is_flag=True,
    help="torch.compile the decode step: faster decoding on small models, after a "
    "compilation of about a minute per new batch shape.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def generate_command(
    model,
    device,
    dtype,
    prompts,
    prompts_file,
    method,
    keep,
    token_ratio,
    selector,
    levels_file,
    mode,
    layers,
    max_new_tokens,
    batch_size,
    compile_step,
    as_json,
):
    """Generate text with CoreInfer or levels sparsity and show the realized density.

    Each prompt's core neurons are chosen at its prefill; every generated token runs
    only those neurons of each sparse layer.
    """
    from autosparse.errors import ConfigError

    texts = list(prompts)
    if prompts_file:
        texts += [line for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    if not texts:
        raise ConfigError("give --prompt TEXT or --prompts-file FILE")
    chosen = build_method(method, keep, token_ratio, levels_file, mode, layers, selector)
    loaded = load(model, device, dtype)

    from autosparse.generation import generate

    run = generate(
        loaded.model,
        loaded.tokenizer,
        texts,
        chosen,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        compile=compile_step,
    )
    if as_json:
        click.echo(json.dumps(_as_dict(loaded.source, run), indent=2))
        return
    _render(loaded.source, run)


def _as_dict(source: str, run) -> dict:
    return {
        "model": source,
        "method": run.method.to_dict(),
        "realized_density": run.density,
        "layers": run.layers,
        "layer_density": run.layer_density,
        "seconds": run.seconds,
        "generations": [
            {"prompt": g.prompt, "text": g.text, "new_tokens": g.new_tokens, "density": g.density}
            for g in run.generations
        ],
    }


def _render(source: str, run) -> None:
    from rich.table import Table

    console = make_console()
    for g in run.generations:
        console.rule(f"[bold]{g.prompt}")
        console.print(g.text, markup=False, highlight=False)
    if run.layers:
        table = Table(title=f"Realized kept fraction per layer ({run.method.label()})")
        table.add_column("layer", justify="right")
        table.add_column("planned keep", justify="right")
        table.add_column("realized kept", justify="right")
        table.add_column("", justify="left")
        keeps = (
            run.method.keep
            if isinstance(run.method.keep, tuple)
            else [run.method.keep] * len(run.layers)
        )
        for layer, planned, kept in zip(run.layers, keeps, run.layer_density, strict=True):
            table.add_row(str(layer), f"{planned:.2f}", f"{kept:.3f}", "█" * round(kept * 40))
        console.print(table)
    tokens = sum(g.new_tokens for g in run.generations)
    density = "dense" if run.density is None else f"{run.density:.3f}"
    console.print(
        f"{source}: {len(run.generations)} prompt(s), {tokens} new tokens in {run.seconds:.1f} s; "
        f"realized density {density}"
    )


COMMANDS = [generate_command]
