"""Shared CLI plumbing: error handling and option groups used by several commands."""

from __future__ import annotations

import sys

import click

from autosparse.errors import AutosparseError


class AutosparseGroup(click.Group):
    """Turns AutosparseError, bad options (click's usage errors) and Ctrl-C into a
    one-line message and a non-zero exit (1, 2 and 130)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "autosparse"
            click.echo(f"Error: {exc.format_message()} (see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except AutosparseError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)


def device_options(f):
    """--device, --dtype."""
    f = click.option(
        "--dtype",
        default="auto",
        show_default=True,
        help="float32, float16, bfloat16 or auto (float32 on CPU, float16 on GPU).",
    )(f)
    return click.option(
        "--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, mps or auto."
    )(f)


def model_options(f):
    """--model, --device, --dtype."""
    return click.option(
        "--model",
        "model",
        default="smollm2-135m",
        show_default=True,
        help=(
            "Hub id, local folder, or alias (smollm2-135m, qwen2.5-0.5b, qwen2.5-1.5b, "
            "llama3-3b, opt-6.7b)."
        ),
    )(device_options(f))


def layers_option(f):
    return click.option(
        "--layers",
        default=None,
        help="Sparse layers as START:STOP (stop exclusive). Default: 6:27 (the reference's) "
        "when the model has at least 27 layers, else all but the first and last.",
    )(f)


def batch_size_option(default: int, help: str):
    """--batch-size: a positive integer; what a batch is differs by command."""
    return click.option(
        "--batch-size", type=click.IntRange(1), default=default, show_default=True, help=help
    )


def mode_option(f):
    return click.option(
        "--mode",
        type=click.Choice(["masked", "sliced"]),
        default="masked",
        show_default=True,
        help="masked: dense compute with unkept neurons zeroed (batch-friendly); "
        "sliced: gathered weights (the mode that saves time).",
    )(f)


def selector_option(f):
    return click.option(
        "--selector",
        type=click.Choice(["coreinfer", "griffin"]),
        default="coreinfer",
        show_default=True,
        help="Which neurons a prompt keeps (the keep ratio or levels say how many): "
        "coreinfer ranks by CoreInfer's token votes; griffin by the norm of each neuron's "
        "activations over the prompt's tokens, each token scaled to unit norm (GRIFFIN; "
        "no token ratio, always keeps exactly the planned count).",
    )(f)


def sparsity_options(f):
    """--method, --keep, --token-ratio, --selector, --levels, --mode (shared by generate
    and eval)."""
    for opt in reversed(
        [
            click.option(
                "--method",
                type=click.Choice(["dense", "coreinfer", "levels"]),
                default="coreinfer",
                show_default=True,
                help="dense; coreinfer (one keep ratio for every sparse layer); "
                "levels (per-layer keep ratios from --levels).",
            ),
            click.option(
                "--keep",
                type=float,
                default=0.4,
                show_default=True,
                help="Kept fraction of FFN neurons per sparse layer (CoreInfer's 'sparsity').",
            ),
            click.option(
                "--token-ratio",
                type=float,
                default=0.2,
                show_default=True,
                help="CoreInfer token ratio: per-token quota as a fraction of positive activations.",
            ),
            selector_option,
            click.option(
                "--levels",
                "levels_file",
                type=click.Path(dir_okay=False),
                default=None,
                help="Levels file (JSON from `autosparse levels`, or a plain per-layer list).",
            ),
            mode_option,
            layers_option,
        ]
    ):
        f = opt(f)
    return f


def build_method(
    method: str,
    keep: float,
    token_ratio: float,
    levels_file: str | None,
    mode: str,
    layers: str | None,
    selector: str = "coreinfer",
):
    """The Method a command's --method/--keep/--token-ratio/--levels/--mode/--layers/
    --selector describe. A levels file's own layer range applies unless --layers
    overrides it."""
    from autosparse.errors import ConfigError
    from autosparse.methods import Method

    if method == "dense":
        if selector != "coreinfer":
            raise ConfigError(
                f"--selector {selector} needs --method coreinfer or levels, not dense"
            )
        return Method.dense()
    if method == "coreinfer":
        if levels_file:
            raise ConfigError("--levels goes with --method levels, not coreinfer")
        return Method.coreinfer(keep, token_ratio, layers=layers, mode=mode, selector=selector)
    if not levels_file:
        raise ConfigError(
            "--method levels needs --levels FILE (write one with `autosparse levels`)"
        )
    from autosparse.levels import read_levels_file

    loaded = read_levels_file(levels_file)
    return Method.levels(
        loaded.levels,
        token_ratio,
        layers=layers or loaded.layers,
        mode=mode,
        selector=selector,
        params=dict(loaded.params),
    )


def load(model: str, device: str, dtype: str):
    """Load a model with a status line on stderr (loading can take a while)."""
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from autosparse.models import load_model

    hf_logging.disable_progress_bar()  # the status line below says what is happening
    with Console(stderr=True).status(f"loading {model} ..."):
        return load_model(model, device=device, dtype=dtype)


def console(stderr: bool = False):
    """A rich console for command output. Tables are wide; when the output is not a
    terminal (a pipe, a file, CI logs) rich would wrap them at 80 columns, so use 160."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, width=width)
