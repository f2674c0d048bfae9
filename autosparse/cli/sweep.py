"""``autosparse sweep``: quality against kept fraction over several goals."""

from __future__ import annotations

import json

import click

from autosparse.cli.base import console as make_console
from autosparse.cli.tune import (
    DEFAULT_MODEL,
    DEFAULT_TASK,
    EMBEDDED_FINALIZE_LIMIT,
    finalize_command,
    study_spec,
    tune_command,
)
from autosparse.sweep import DEFAULT_GOALS

#: tune's options a sweep does not take (it sets the goal and names each study itself) or
#: defines for itself
_NOT_FROM_TUNE = {"goal", "goal_from_baseline", "study_name", "storage"}
#: finalize's options a sweep takes as they are (the others are tune's or its own)
_FROM_FINALIZE = {"limit", "full", "select", "as_json"}


@click.command("sweep")
@click.option(
    "--goals",
    default=",".join(f"{g:g}" for g in DEFAULT_GOALS),
    show_default=True,
    help="Goal mean keep ratios, separated by commas: one study per goal.",
)
@click.option(
    "--name",
    default=None,
    help="Sweep name: outputs go to studies/NAME/ (default: MODEL-TASK-sweep).",
)
@click.option(
    "--storage",
    default=None,
    help="SQLAlchemy URL of one database for every study of the sweep and its evaluations "
    "(default: each study in sqlite:///studies/STUDY.db, as tune stores it, and the sweep's "
    "evaluations in studies/NAME/results.db).",
)
@click.option(
    "--top-k",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Per goal, evaluate the best trial and the AVG of the levels of this many best trials.",
)
def sweep_command(**opts):
    """Quality against kept fraction: tuned levels and CoreInfer over several goals.

    Tunes or resumes one study per goal (named and stored as `tune` would: MODEL-TASK-gGOAL,
    with tune's options), then evaluates dense, CoreInfer at each goal as its keep (and at
    --baseline-keep), and each study's best trial and the AVG of its top-k trials on the
    same held-out documents. Prints and writes studies/NAME/sweep.md, sweep.json and a plot
    sweep.png of quality against realized density, and states the iso-quality saving: the
    realized density at which the tuned levels (AVG) reach CoreInfer's quality at
    --baseline-keep, with a bootstrap interval over documents. Rerunning resumes every
    study and reuses every stored evaluation.
    """
    from autosparse.cli.tune import _status_printer, _trial_printer
    from autosparse.errors import ConfigError
    from autosparse.sweep import iso_sentences, parse_goals, run_sweep, sweep_table

    o = opts
    goals = parse_goals(o["goals"])
    if o["limit"] is not None and o["full"]:
        raise ConfigError("give --limit N or --full, not both")
    embedded = o["model"] == DEFAULT_MODEL and o["task"] == DEFAULT_TASK
    if embedded and o["limit"] is None and not o["full"]:
        o["limit"] = EMBEDDED_FINALIZE_LIMIT
    o["goal"], o["goal_from_baseline"] = goals[0], None
    spec = study_spec(o)
    console = make_console(stderr=o["as_json"])
    sweep, paths = run_sweep(
        spec,
        goals,
        name=o["name"],
        storage=o["storage"],
        trials=o["trials"],
        timeout=o["timeout"],
        device=o["device"],
        dtype=o["dtype"],
        mode=o["mode"],
        batch_size=o["batch_size"],
        max_gen_toks=o["max_gen_toks"],
        prompt_cache_gb=o["prompt_cache_gb"],
        reference_calibration=o["reference_calibration"],
        enqueue_reference=o["enqueue_reference"],
        top_k=o["top_k"],
        limit=o["limit"],
        select=o["select"],
        heartbeat=o.get("heartbeat"),
        on_status=_status_printer(console),
        on_trial=_trial_printer(console),
        progress=True,
    )
    if o["as_json"]:
        from autosparse.sweep import to_json

        click.echo(json.dumps(to_json(sweep), indent=2))
        return
    console.print(sweep_table(sweep))
    for sentence in iso_sentences(sweep):
        console.print(sentence)
    console.print(f"wrote {paths[0]}, {paths[1]} and {paths[2]}")


sweep_command.params += [p for p in tune_command.params if p.name not in _NOT_FROM_TUNE]
sweep_command.params += [p for p in finalize_command.params if p.name in _FROM_FINALIZE]

COMMANDS = [sweep_command]
