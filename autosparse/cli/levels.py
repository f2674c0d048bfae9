"""``autosparse levels``: per-layer keep ratios from calibration statistics."""

from __future__ import annotations

import json

import click

from autosparse.cli.base import batch_size_option, layers_option, model_options
from autosparse.cli.base import console as make_console


@click.command("levels")
@model_options
@click.option(
    "--task",
    default=None,
    help="Task whose documents give the calibration prompts (a name or alias as for "
    "`autosparse eval`). Not needed with --calibration-file.",
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Score threshold theta: a neuron counts when w_sum*s + w_count*n > theta.",
)
@click.option(
    "--goal",
    type=float,
    default=None,
    help="Mean keep ratio over the sparse layers to reach (CoreInfer's 'sparsity' number, "
    "e.g. 0.4 keeps 40%); the threshold is solved for.",
)
@click.option(
    "--w-sum", type=float, default=0.45, show_default=True, help="Weight of the sum term."
)
@click.option(
    "--w-count",
    type=float,
    default=None,
    help="Weight of the count term. Default: 1 - w_sum (as the seed).",
)
@click.option(
    "--top-k",
    type=click.IntRange(1),
    default=100,
    show_default=True,
    help="Sums are divided by the top_k-th largest sum of their prompt and layer.",
)
@layers_option
@click.option(
    "--calibration",
    "n_calibration",
    type=click.IntRange(1),
    default=100,
    show_default=True,
    help="Number of calibration prompts: drawn from the task, or the first N non-empty "
    "lines of --calibration-file.",
)
@click.option(
    "--calibration-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Calibration prompts from a text file, one per line (instead of the task's).",
)
@click.option(
    "--calibration-seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the random draw of calibration documents.",
)
@click.option(
    "--exclude-limit",
    type=click.IntRange(0),
    default=100,
    show_default=True,
    help="Draw calibration documents apart from the N-document sample that "
    "`autosparse eval --limit N --seed SEED` scores (0: exclude nothing). The chosen ids "
    "are written to the levels file either way.",
)
@click.option(
    "--seed",
    type=int,
    default=42,
    show_default=True,
    help="Seed of that evaluation sample.",
)
@click.option(
    "--reference-calibration",
    is_flag=True,
    help="The seed's choice instead: the first N documents of the evaluated split with the "
    "gold answer appended. They overlap the evaluation data.",
)
@click.option(
    "--include-path",
    type=click.Path(exists=True),
    multiple=True,
    help="Folder (or YAML) with your own lm-eval task configs (repeatable).",
)
@batch_size_option(8, "Calibration prompts per dense forward pass.")
@click.option(
    "--max-tokens",
    type=click.IntRange(1),
    default=1024,
    show_default=True,
    help="Calibration prompts are cut to their first N tokens.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default="studies/calibration",
    show_default=True,
    help="Where calibration statistics are kept and reused.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a levels file (JSON).",
)
@click.option(
    "--plot", type=click.Path(dir_okay=False), default=None, help="Write a PNG of level vs layer."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def levels_command(
    model,
    device,
    dtype,
    task,
    threshold,
    goal,
    w_sum,
    w_count,
    top_k,
    layers,
    n_calibration,
    calibration_file,
    calibration_seed,
    exclude_limit,
    seed,
    reference_calibration,
    include_path,
    batch_size,
    max_tokens,
    cache_dir,
    output,
    plot,
    as_json,
):
    """Per-layer keep ratios ("levels") from calibration statistics.

    One dense pass over the calibration prompts records per prompt and layer the
    positive sums and counts of the FFN activations; they are kept in --cache-dir and
    reused, so any later setting costs milliseconds. A layer's level is the mean over
    prompts of the fraction of neurons with w_sum*s + w_count*n > threshold (see
    docs/levels.md). Give --threshold, or --goal to solve for the threshold.
    """
    from autosparse.calibration import CalibrationChoice
    from autosparse.cli.base import load
    from autosparse.levels_workflow import plot_levels, run_levels

    choice = CalibrationChoice(
        task=task,
        n=n_calibration,
        seed=calibration_seed,
        reference=reference_calibration,
        exclude_limit=exclude_limit,
        exclude_seed=seed,
        file=calibration_file,
        include_path=tuple(include_path),
    )
    outcome = run_levels(
        model,
        choice,
        threshold=threshold,
        goal=goal,
        w_sum=w_sum,
        w_count=w_count,
        top_k=top_k,
        layers=layers,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        max_tokens=max_tokens,
        cache_dir=cache_dir,
        loader=load,
    )
    if as_json:
        click.echo(json.dumps(outcome.to_json(), indent=2))
    else:
        _render(outcome)
    if plot:
        plot_levels(plot, outcome)
    if output:
        outcome.write(output)
        if not as_json:
            click.echo(f"wrote {output}")


COMMANDS = [levels_command]


def _render(outcome) -> None:
    from autosparse.report import levels_table

    result, calibration, model_id = outcome.result, outcome.calibration, outcome.model_id
    console = make_console()
    where = calibration.get("task") or calibration["source"].removeprefix("file:")
    title = f"levels (kept fraction per layer, CoreInfer 'sparsity') · {model_id}"
    console.print(levels_table(list(result.layers), list(result.levels), title=title))
    params = ", ".join(f"{k}={v:g}" for k, v in result.params.items())
    line = f"{params}; mean kept {result.mean:.4f}"
    if result.goal is not None:
        line += f" (goal {result.goal:g})"
    console.print(line)
    reuse = "reused" if calibration["reused"] else "computed"
    console.print(
        f"calibration: {calibration['prompts']} prompts from {where} "
        f"({calibration['selection']}), statistics {reuse}",
        style="dim",
    )
