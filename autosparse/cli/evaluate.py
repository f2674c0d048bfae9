"""``autosparse eval``: one method on one task through lm-eval, stored and shown."""

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


@click.command("eval")
@model_options
@click.option(
    "--task",
    required=True,
    help="lm-eval task name or alias (truthfulqa, bertaqa, squadv2, csqa, triviaqa, wmt16), "
    "a local task (truthfulqa-local, csqa-local, csqa-local-letters, nq-local, asdiv-local), "
    "or a task from --include-path.",
)
@sparsity_options
@click.option(
    "--limit",
    type=click.IntRange(1),
    default=None,
    help="Score a seeded random sample of N documents (the same for every method). Default: all.",
)
@click.option("--seed", type=int, default=42, show_default=True, help="Sample and lm-eval seed.")
@batch_size_option(1, "Requests per model call (the reference used 1).")
@click.option(
    "--num-fewshot",
    type=click.IntRange(0),
    default=None,
    help="Few-shot examples. Default: 6 (the reference's); tasks fixed at 0 shots keep 0.",
)
@click.option(
    "--metric",
    default=None,
    help="Primary metric. Default: the task's (e.g. acc, bleu_max). fidelity / kl: score "
    "the method on the dense model's own greedy continuations (docs/fidelity.md).",
)
@click.option(
    "--include-path",
    type=click.Path(exists=True),
    multiple=True,
    help="Folder (or YAML) with your own lm-eval task configs (repeatable).",
)
@click.option(
    "--max-gen-toks",
    type=click.IntRange(1),
    default=None,
    help="Cap on generated tokens per request. Default: the task's (usually 256).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--force", is_flag=True, help="Evaluate again even if the result is stored.")
@click.option(
    "--storage",
    default=None,
    help="Result store URL (SQLAlchemy). Default: sqlite:///studies/autosparse.db.",
)
def eval_command(
    model,
    device,
    dtype,
    task,
    method,
    keep,
    token_ratio,
    selector,
    levels_file,
    mode,
    layers,
    limit,
    seed,
    batch_size,
    num_fewshot,
    metric,
    include_path,
    max_gen_toks,
    as_json,
    force,
    storage,
):
    """Evaluate a model on a task under dense, CoreInfer or levels sparsity.

    Generation tasks select core neurons from each prompt and generate sparse;
    log-likelihood tasks (multiple choice) score each answer with its tokens after
    the first running sparse. Results are stored and reused unless --force.
    """
    from autosparse.evaluate import evaluate_method

    chosen = build_method(method, keep, token_ratio, levels_file, mode, layers, selector)
    outcome = evaluate_method(
        model,
        task,
        chosen,
        limit=limit,
        seed=seed,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        metric=metric,
        include_path=include_path,
        max_gen_toks=max_gen_toks,
        device=device,
        dtype=dtype,
        storage=storage,
        force=force,
        progress=not as_json,
        load=load,
    )
    if as_json:
        click.echo(json.dumps({**_plain(outcome.result), "cached": outcome.cached}, indent=2))
    else:
        _render(outcome.result, chosen, outcome.cached)


def _plain(result) -> dict:
    from autosparse.results import EvalResult

    base = EvalResult.to_dict(result)
    return {k: base[k] for k in EvalResult.__dataclass_fields__}


def _render(result, method, cached: bool) -> None:
    from rich.table import Table

    console = make_console()
    title = f"{result.task} · {method.label()} · {result.model}"
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row(f"[bold]{result.metric}[/bold]", f"[bold]{result.score:.4g}[/bold]")
    for name, value in sorted(result.metrics.items()):
        if name != result.metric:
            table.add_row(name, f"{value:.4g}")
    density = "dense" if result.density is None else f"{result.density:.3f}"
    table.add_row("realized density", density)
    if method.name != "dense":
        table.add_row("planned mean keep", f"{method.mean_keep:.3f}")
    table.add_row("samples", str(len(result.sample_ids)))
    table.add_row("time", f"{result.seconds:.1f} s" + (" (stored result)" if cached else ""))
    console.print(table)


COMMANDS = [eval_command]
