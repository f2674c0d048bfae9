"""``autosparse tune``, ``finalize``, ``studies`` and ``show``: the tuning workflow."""

from __future__ import annotations

import json

import click

from autosparse.cli.base import (
    batch_size_option,
    device_options,
    layers_option,
    mode_option,
    model_options,
    selector_option,
)
from autosparse.cli.base import console as make_console
from autosparse.tuning import HEARTBEAT

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TASK = "csqa-local"
#: the small real study `autosparse tune` runs with no options (a few minutes on a CPU).
#: Chosen by measurement (benchmarks/demo_choice.py, docs/tasks.md): with 6 shots and
#: keep 0.2, SmolLM2-135M's dense accuracy is well above chance and its gap to CoreInfer
#: (+0.10 on 300 documents) is resolved by the held-out sample; at 0 shots neither holds,
#: and at keep 0.3 or 0.4 the gap (0.04-0.08) needs more documents than a demo affords.
EMBEDDED = {
    "trials": 8,
    "screen": 30,
    "calibration": 32,
    "num_fewshot": 6,
    "goal": 0.2,
    "baseline_keep": 0.2,
}
#: the reference workflow's sizes (num_fewshot None: the task's default, 6 shots); goal
#: 0.4 is the reference's goal for Llama-3.2-3B, and CoreInfer's keep
REFERENCE = {
    "trials": 20,
    "screen": 100,
    "calibration": 100,
    "num_fewshot": None,
    "goal": 0.4,
    "baseline_keep": 0.4,
}
#: finalize's sample for the embedded default study when neither --limit nor --full is given
EMBEDDED_FINALIZE_LIMIT = 150


def embedded_study_name() -> str:
    """The study `autosparse tune` with no options creates, and `finalize` with no
    --study reads."""
    from autosparse.tuning import default_study_name

    return default_study_name(DEFAULT_MODEL, DEFAULT_TASK, EMBEDDED["goal"], None)


def study_options(f):
    f = click.option(
        "--storage",
        default=None,
        help="SQLAlchemy URL of the study database (default: sqlite:///studies/NAME.db). "
        "Use a PostgreSQL URL to share a study between machines.",
    )(f)
    f = click.option(
        "--study",
        "study_name",
        default=None,
        help="Study name (default: MODEL-TASK-gGOAL, with -griffin for --selector griffin).",
    )(f)
    return f


def study_spec(o: dict):
    """The StudySpec that tune's options ``o`` describe. Fills in ``o`` the defaults that
    depend on the model and task (the embedded default study's sizes or the reference's):
    trials, screen, calibration, num_fewshot, goal (unless --goal-from-baseline) and
    baseline keep."""
    from autosparse.models import model_identity
    from autosparse.tuning import StudySpec

    embedded = o["model"] == DEFAULT_MODEL and o["task"] == DEFAULT_TASK
    defaults = dict(EMBEDDED if embedded else REFERENCE)
    if o["goal"] is not None or o["goal_from_baseline"] is not None:
        # the embedded goal and CoreInfer keep go together; a goal of one's own is
        # compared with CoreInfer at the reference's keep unless --baseline-keep says
        defaults["baseline_keep"] = REFERENCE["baseline_keep"]
        defaults.pop("goal")
    for key, value in defaults.items():
        if o[key] is None:
            o[key] = value
    try:
        top_k_choices = tuple(int(x) for x in o["top_k_choices"].split(","))
    except ValueError:
        from autosparse.errors import ConfigError

        raise ConfigError(
            f"--top-k-choices must be integers separated by commas, not {o['top_k_choices']!r}"
        ) from None
    spec = StudySpec(
        model=o["model"],
        model_id="",
        task=o["task"],
        goal=o["goal"],
        goal_from_baseline=o["goal_from_baseline"],
        screen=o["screen"],
        seed=o["seed"],
        layers=o["layers"],
        baseline_keep=o["baseline_keep"],
        token_ratio=o["token_ratio"],
        strategy=o["strategy"],
        tolerance=o["tolerance"],
        metric=o["metric"],
        num_fewshot=o["num_fewshot"],
        calibration=o["calibration"],
        top_k_choices=top_k_choices,
        prune=not o["no_prune"],
        objective=o["objective"],
        selector=o["selector"],
        **_space_fields(o),
    )
    from dataclasses import replace

    return replace(spec, model_id=model_identity(o["model"]))


def _space_fields(o: dict) -> dict:
    """StudySpec's search-space fields from the options (commands without them: formula)."""
    if "space" not in o:
        return {}
    return {
        "space": o["space"],
        "grid": o["grid"],
        "keep_range": (o["keep_min"], o["keep_max"]),
        "max_moves": o["max_moves"],
    }


def space_options(f):
    """--space and the free space's grid, bounds and moves."""
    for decorator in reversed(
        [
            click.option(
                "--space",
                type=click.Choice(["formula", "free"]),
                default="formula",
                show_default=True,
                help="formula: search the levels formula's parameters; free: search the "
                "per-layer keep vector itself at the goal mean (level-switch evolution).",
            ),
            click.option(
                "--grid",
                type=float,
                default=0.025,
                show_default=True,
                help="Free space: the step of a layer's keep ratio.",
            ),
            click.option(
                "--keep-min",
                type=float,
                default=0.05,
                show_default=True,
                help="Free space: the lowest keep ratio of a layer.",
            ),
            click.option(
                "--keep-max",
                type=float,
                default=1.0,
                show_default=True,
                help="Free space: the highest keep ratio of a layer.",
            ),
            click.option(
                "--max-moves",
                type=click.IntRange(1),
                default=3,
                show_default=True,
                help="Free space: a child differs from its parent by 1 to this many level "
                "switches (one grid step moved from one layer to another).",
            ),
        ]
    ):
        f = decorator(f)
    return f


@click.command("tune")
@model_options
@click.option(
    "--task",
    default=DEFAULT_TASK,
    show_default=True,
    help="Task name or alias (see docs/tasks.md).",
)
@click.option(
    "--goal",
    type=float,
    default=None,
    help="Goal mean keep ratio over the sparse layers (CoreInfer's 'sparsity') "
    "[default: 0.4; 0.2 for the embedded default study].",
)
@click.option(
    "--goal-from-baseline",
    type=float,
    default=None,
    help="Goal = this factor x CoreInfer's realized density on the screen (the seed's "
    "'10%% fewer neurons' round is 0.9).",
)
@click.option(
    "--trials",
    type=click.IntRange(1),
    default=None,
    help="Finished trials the study should hold; a rerun resumes up to this "
    "[default: 20; 8 for the embedded default study].",
)
@click.option(
    "--timeout", type=float, default=None, help="Stop starting trials after this many seconds."
)
@click.option(
    "--screen",
    type=click.IntRange(1),
    default=None,
    help="Screening samples, a seeded random sample [default: 100; 30 for the embedded "
    "default study].",
)
@click.option(
    "--seed",
    type=int,
    default=42,
    show_default=True,
    help="Seed of the screen, calibration draw, sampler and lm-eval.",
)
@study_options
@click.option(
    "--baseline-keep",
    type=float,
    default=None,
    help="Keep ratio of the baseline (one for every sparse layer, chosen by --selector) "
    "[default: 0.4; 0.2 for the embedded default study without --goal].",
)
@click.option(
    "--token-ratio",
    type=float,
    default=0.2,
    show_default=True,
    help="CoreInfer token ratio (also used by the levels).",
)
@selector_option
@layers_option
@click.option(
    "--strategy",
    type=click.Choice(["solve", "constrained"]),
    default="solve",
    show_default=True,
    help="solve: the threshold is solved for the goal; constrained: sampled, with |mean - goal| <= tolerance as a constraint.",
)
@space_options
@click.option(
    "--tolerance",
    type=float,
    default=0.01,
    show_default=True,
    help="Goal tolerance of the constrained strategy.",
)
@click.option(
    "--top-k-choices", default="25,50,100,200,400", show_default=True, help="Values top_k may take."
)
@click.option(
    "--calibration",
    type=click.IntRange(1),
    default=None,
    help="Calibration prompts for the levels statistics [default: 100; 32 for the "
    "embedded default study].",
)
@click.option(
    "--reference-calibration",
    is_flag=True,
    help="Calibrate like the reference: the first N documents with their gold answers (overlaps evaluation).",
)
@click.option(
    "--enqueue-reference", is_flag=True, help="Run the reference grid's hits as the first trials."
)
@click.option(
    "--num-fewshot",
    type=int,
    default=None,
    help="Few-shot examples [default: the reference's 6, or the task's own; 0 for the "
    "embedded default study].",
)
@click.option(
    "--metric",
    default=None,
    help="Task metric for --objective task (default: the task's primary metric).",
)
@click.option(
    "--objective",
    type=click.Choice(["task", "fidelity", "kl"]),
    default=None,
    help="task: the task metric on the screen; fidelity: mean log-likelihood of the dense "
    "model's own continuation (one teacher-forced pass, no generation); kl: minus the KL to "
    "the dense next-token distributions. finalize always reports the task metric. "
    "[default: task; kl with --space free]",
)
@click.option(
    "--prompt-cache-gb",
    type=click.FloatRange(0),
    default=4.0,
    show_default=True,
    help="With --objective fidelity/kl: memory (on the model's device) for the screen's "
    "prompts run once per study; 0 runs them again in every trial.",
)
@batch_size_option(8, "Requests per model call.")
@click.option(
    "--max-gen-toks",
    type=click.IntRange(1),
    default=None,
    help="Cap generated tokens per sample (generation tasks).",
)
@click.option("--no-prune", is_flag=True, help="Evaluate every trial on the whole screen.")
@click.option(
    "--heartbeat",
    type=click.IntRange(1),
    default=HEARTBEAT,
    show_default=True,
    help="Seconds between a running trial's heartbeats. A trial silent for 3 heartbeats "
    "belongs to a dead worker and is run again; give every worker of a study the same value.",
)
@mode_option
def tune_command(**opts):
    """Tune the levels parameters against a goal mean keep ratio.

    Each trial turns (w_sum, top_k[, threshold]) into per-layer levels from cached
    calibration statistics and runs sparse inference on the screen; CoreInfer and dense
    are evaluated once on the same screen. With --space free a trial's parameters are the
    per-layer keep ratios themselves (see docs/search.md). Rerunning the command resumes
    the study.
    With no options it runs a small real study offline (SmolLM2-135M, CommonsenseQA).
    """

    from autosparse.workflow import run_tune

    o = opts
    spec = study_spec(o)
    console = make_console()
    outcome = run_tune(
        spec,
        study_name=o["study_name"],
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
        on_status=_status_printer(console),
        on_trial=_trial_printer(console),
        progress=True,
        heartbeat=o["heartbeat"],
    )
    console.print(outcome.summary)


def _status_printer(console):
    return lambda message: console.print(f"[dim]{message}[/dim]")


def _trial_printer(console):
    from autosparse.report import trial_line

    return lambda report, metric: console.print(trial_line(report, metric))


@click.command("finalize")
@study_options
@click.option(
    "--top-k",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="How many of the best trials to evaluate (plus their AVG).",
)
@click.option(
    "--limit",
    type=click.IntRange(1),
    default=None,
    help="Evaluate a seeded held-out sample of this size instead of the full set.",
)
@click.option(
    "--full",
    is_flag=True,
    help="Evaluate every document but the calibration ones (the default when --limit is not given, except for the embedded default study).",
)
@click.option(
    "--select",
    type=click.Choice(["mean", "lcb"]),
    default="mean",
    show_default=True,
    help="Rank trials by screen mean or by the lower confidence bound of their gain over CoreInfer.",
)
@device_options
@batch_size_option(8, "Requests per model call.")
@click.option(
    "--max-gen-toks",
    type=click.IntRange(1),
    default=None,
    help="Cap generated tokens per sample. Default: the cap the study was tuned with, else the task's.",
)
@mode_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def finalize_command(**opts):
    """Evaluate a study's best trials and their AVG beside CoreInfer and dense.

    Also reports the best trial's screen-to-held-out gap in the study's objective.
    Writes studies/NAME/report.md, report.json and levels.png (the evaluated level
    vectors by layer). Without --study it finalizes the embedded default study, on a
    held-out sample of 150 documents unless --limit or --full says otherwise.
    """

    from autosparse.errors import ConfigError
    from autosparse.report import gap_line, report_tables, to_json
    from autosparse.workflow import run_finalize

    o = opts
    if o["limit"] is not None and o["full"]:
        raise ConfigError("give --limit N or --full, not both")
    if o["study_name"] is None and o["limit"] is None and not o["full"]:
        o["limit"] = EMBEDDED_FINALIZE_LIMIT
    console = make_console(stderr=o["as_json"])
    report, paths = run_finalize(
        o["study_name"] or embedded_study_name(),
        storage=o["storage"],
        top_k=o["top_k"],
        limit=o["limit"],
        select=o["select"],
        device=o["device"],
        dtype=o["dtype"],
        mode=o["mode"],
        batch_size=o["batch_size"],
        max_gen_toks=o["max_gen_toks"],
        on_status=_status_printer(console),
        progress=True,
    )
    if o["as_json"]:
        click.echo(json.dumps(to_json(report), indent=2))
        return
    for table in report_tables(report):
        console.print(table)
    console.print(gap_line(report.meta))
    console.print(f"wrote {paths[0]}, {paths[1]} and {paths[2]}")


@click.command("studies")
@click.option("--storage", default=None, help="A study database URL (default: every studies/*.db).")
def studies_command(storage):
    """List studies with their best trial."""
    from rich.table import Table

    from autosparse.workflow import list_studies

    table = Table(title="Studies")
    for col in ("study", "model", "task", "goal", "trials", "best", "best trial", "storage"):
        table.add_column(col)
    for row in list_studies(storage):
        table.add_row(*[str(x) if x is not None else "-" for x in row])
    make_console().print(table)


@click.command("show")
@click.argument("name")
@click.option(
    "--storage", default=None, help="The study's database URL (default: sqlite:///studies/NAME.db)."
)
def show_command(name, storage):
    """Print a study's trials: parameters, achieved mean keep, density, score, gain vs CoreInfer."""

    from autosparse.report import study_tables
    from autosparse.workflow import study_summary

    console = make_console()
    for renderable in study_tables(study_summary(name, storage)):
        console.print(renderable)


COMMANDS = [tune_command, finalize_command, studies_command, show_command]
