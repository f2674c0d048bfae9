"""``autosparse levels``: per-layer keep ratios from calibration statistics."""

from __future__ import annotations

import json
from pathlib import Path

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
    from autosparse.errors import ConfigError
    from autosparse.levels import check_setting

    if (threshold is None) == (goal is None):
        raise ConfigError("give exactly one of --threshold X or --goal G")
    if w_count is None:
        w_count = round(1.0 - w_sum, 10)
    check_setting(w_sum, w_count, 0.0 if threshold is None else threshold, top_k)
    if goal is not None and not (0.0 < goal <= 1.0):
        raise ConfigError(f"--goal {goal} is not a mean keep ratio in (0, 1]")

    source, samples, how = _calibration_samples(
        task,
        n_calibration,
        calibration_file,
        calibration_seed,
        exclude_limit,
        seed,
        reference_calibration,
        include_path,
    )

    from autosparse.calibration import load_or_collect
    from autosparse.levels import LevelsIndex
    from autosparse.models import model_identity

    model_id = model_identity(model)

    def load_model():
        from autosparse.cli.base import load

        loaded = load(model, device, dtype)
        return loaded.model, loaded.tokenizer

    stats, reused = load_or_collect(
        cache_dir,
        model_id=model_id,
        source=source,
        samples=samples,
        load_model=load_model,
        batch_size=batch_size,
        max_tokens=max_tokens,
        dtype=dtype,
        meta=how,
    )
    index = LevelsIndex.from_stats(stats, layers)
    if goal is not None:
        result = index.solve_goal(goal, w_sum, w_count, top_k)
    else:
        result = index.evaluate(w_sum, w_count, threshold, top_k)

    calibration = {
        "source": source,
        **how,
        "prompts": stats.num_prompts,
        "sample_ids": list(stats.sample_ids),
        "reused": reused,
    }
    doc = {
        "model": model_id,
        "layers": result.layer_range,
        "levels": list(result.levels),
        "mean": result.mean,
        "goal": result.goal,
        "params": result.params,
        "calibration": calibration,
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        _render(result, calibration, model_id)
    if plot:
        _plot(plot, result, model_id)
    if output:
        zero = [layer for layer, x in zip(result.layers, result.levels, strict=True) if x <= 0]
        if zero:
            raise ConfigError(
                f"layer(s) {', '.join(map(str, zero))} get level 0.00 (no neuron kept), which "
                "the engine cannot run; lower --threshold, raise --goal, or change --layers"
            )
        from autosparse.levels import write_levels_file

        write_levels_file(output, result, model=model_id, extra={"calibration": calibration})
        if not as_json:
            click.echo(f"wrote {output}")


COMMANDS = [levels_command]


def _calibration_samples(
    task,
    n,
    calibration_file,
    calibration_seed,
    exclude_limit,
    seed,
    reference,
    include_path,
) -> tuple[str, list[tuple[int, str]], dict]:
    """(source key, [(id, text)], how they were chosen) for the cache and the metadata."""
    from autosparse.errors import ConfigError

    if calibration_file:
        if reference:
            raise ConfigError("--reference-calibration draws from --task, not --calibration-file")
        path = Path(calibration_file).resolve()
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {calibration_file}: {exc}") from None
        samples = [(i, line) for i, line in enumerate(lines) if line.strip()][:n]
        if not samples:
            raise ConfigError(f"{calibration_file} has no non-empty lines")
        return f"file:{path}", samples, {"selection": "file", "with_answers": False}
    if not task:
        raise ConfigError(
            "give --task T (calibration from its documents) or --calibration-file FILE"
        )
    import autosparse.tasks as tasks

    if not hasattr(tasks, "calibration_texts"):
        raise ConfigError(
            "this autosparse cannot draw calibration prompts from tasks; use --calibration-file"
        )
    paths = list(include_path) or None
    if reference:
        everything = tasks.sample_ids(task, None, include_path=paths)
        samples = tasks.calibration_texts(
            task, n, exclude_ids=everything[n:], with_answers=True, include_path=paths
        )
        how = {
            "task": task,
            "selection": "reference",
            "with_answers": True,
            "overlaps_evaluation": True,
        }
        return f"task:{task}:reference:first{n}", list(samples), how
    excluded: list[int] = []
    if exclude_limit:
        excluded = tasks.sample_ids(task, exclude_limit, seed, include_path=paths)
    samples = tasks.calibration_texts(
        task, n, exclude_ids=excluded, seed=calibration_seed, include_path=paths
    )
    how = {
        "task": task,
        "selection": "disjoint" if exclude_limit else "random",
        "with_answers": False,
        "excluded_sample": {"limit": exclude_limit, "seed": seed} if exclude_limit else None,
        "calibration_seed": calibration_seed,
    }
    source = f"task:{task}:seed{calibration_seed}:exclude{exclude_limit}/{seed}"
    return source, list(samples), how


def _render(result, calibration: dict, model_id: str) -> None:

    from autosparse.report import levels_table

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


def _plot(path: str, result, model_id: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4))
    try:
        ax.plot(result.layers, result.levels, marker="o")
        ax.axhline(result.mean, linestyle="--", color="gray", label=f"mean {result.mean:.3f}")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("kept fraction (CoreInfer 'sparsity')")
        ax.set_ylim(0, 1.05)
        params = ", ".join(f"{k}={v:g}" for k, v in result.params.items())
        ax.set_title(f"{model_id}\n{params}", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
