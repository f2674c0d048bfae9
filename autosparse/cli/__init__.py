"""The ``autosparse`` command line: parse options, call one library function, render.

Each command lives in its own module here and imports torch/transformers/lm_eval
lazily inside the command, so ``autosparse --help`` answers instantly. Library
errors (AutosparseError) become one-line messages with exit code 1.
"""

from __future__ import annotations

import click

from autosparse import __version__
from autosparse.cli.base import AutosparseGroup


@click.group(cls=AutosparseGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="autosparse")
def main() -> None:
    """Find per-layer keep ratios for activation-sparse LLM inference and test them
    against CoreInfer on real tasks."""
    import os

    # autosparse draws its own rich progress bars; lm-eval's and transformers' tqdm bars
    # would interleave with them. tqdm reads this when it is first imported.
    os.environ.setdefault("TQDM_DISABLE", "1")


def _register() -> None:
    import importlib

    for name in ("generate", "levels", "evaluate", "tune", "sweep", "bench"):
        for command in importlib.import_module(f"autosparse.cli.{name}").COMMANDS:
            main.add_command(command)


_register()
