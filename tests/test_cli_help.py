"""Every command and option explains itself; --help imports nothing heavy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from autosparse.cli import main

COMMANDS = sorted(main.commands)


def test_all_commands_are_registered():
    assert {"generate", "eval", "levels", "tune", "finalize", "studies", "show"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_command_and_options_have_help(name):
    command = main.commands[name]
    assert command.help and len(command.help.strip()) > 20
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"{name} {param.opts[0]} lacks help text"


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from autosparse.cli import main\n"
        "for args in (['--help'], ['tune', '--help'], ['eval', '--help'], ['levels', '--help'],\n"
        "             ['bench', '--help']):\n"
        "    assert CliRunner().invoke(main, args).exit_code == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'lm_eval', 'optuna', 'sqlalchemy') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cli_reference_lists_every_command():
    text = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    for name in COMMANDS:
        assert f"autosparse {name}" in text
        for param in main.commands[name].params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.opts[-1] in text or param.opts[0] in text, f"{name} {param.opts}"


def test_cli_reference_is_up_to_date():
    """docs/cli.md is what docs/cli_reference.py prints: regenerate it after changing an option."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "docs" / "cli_reference.py")],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    ).stdout
    assert out == (root / "docs" / "cli.md").read_text(), (
        "docs/cli.md is stale: python docs/cli_reference.py > docs/cli.md"
    )
