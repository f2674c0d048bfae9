"""Regenerate docs/cli.md from the commands' --help: python docs/cli_reference.py > docs/cli.md"""

from click.testing import CliRunner

from autosparse.cli import main

COMMANDS = ["generate", "eval", "levels", "tune", "finalize", "sweep", "studies", "show", "bench"]

runner = CliRunner(env={"COLUMNS": "100"})
print("# Command-line reference\n")
print("Generated from `autosparse COMMAND --help`. Every command prints a one-line error and exits")
print("with status 1 on bad input (a missing model, an unknown task, a goal outside (0, 1],")
print("an unreachable storage URL) and 2 on a bad option (unknown, or a value out of its")
print("range); Ctrl-C exits with 130 and keeps every finished trial.\n")
print("```\n" + runner.invoke(main, ["--help"], prog_name="autosparse").output.rstrip() + "\n```\n")
for name in COMMANDS:
    print(f"## autosparse {name}\n")
    help_text = runner.invoke(main, [name, "--help"], prog_name="autosparse").output.rstrip()
    print("```\n" + help_text + "\n```\n")
