"""``medlatent``: the command-line tool.

Each command group lives in its own module and only parses flags and calls :mod:`medlatent.api`.
Every problem a user can fix (bad file, unknown key, missing checkpoint, diverged loss, a bad
flag value) is printed as one ``error:`` line with exit code 1; warnings (a damaged checkpoint
skipped) as ``warning:`` lines. Heavy modules (torch, MONAI) are imported inside the commands,
so ``medlatent --help`` answers at once.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from medlatent import __version__, progress
from medlatent.cli import adapt, anomaly, data, display, evaluate, generate, pretrain, restore
from medlatent.cli import export as export_cli
from medlatent.errors import MedlatentError


@click.group(context_settings=dict(help_option_names=["-h", "--help"], max_content_width=100))
@click.version_option(__version__, prog_name="medlatent")
def cli() -> None:
    """Label-efficient learning on biomedical images: self-supervised encoders and their probes."""


for command in [data.data, pretrain.pretrain, *evaluate.COMMANDS, generate.generate, anomaly.anomaly,
                restore.restore, *adapt.COMMANDS, *export_cli.COMMANDS]:
    cli.add_command(command)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Echo(logging.Handler):
    """Library warnings as ``warning: ...`` lines on the current stderr; notes (what a run
    uses: its data and image size) as plain lines on stdout, from the main process only."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            click.echo(f"warning: {_one_line(record.getMessage())}", err=True)
        elif os.environ.get("RANK", "0") == "0":
            click.echo(_one_line(record.getMessage()))


def _warnings_to_stderr() -> None:
    log = logging.getLogger("medlatent")
    if not any(isinstance(h, _Echo) for h in log.handlers):
        log.addHandler(_Echo())
    log.setLevel(logging.INFO)
    log.propagate = False


def main() -> None:
    """Entry point: run the CLI, turning user-fixable problems into one line and exit code 1."""
    _warnings_to_stderr()
    try:
        display.TASKS = display.TaskProgress(display.progress_seconds(), sys.stdout.isatty())
        with progress.listening(lambda task, done, total: display.TASKS(task, done, total)):
            code = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:  # a bad flag or value: one line, with where to read more
        where = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
        click.echo(f"error: {_one_line(e.format_message())}{where}", err=True)
        sys.exit(1)
    except click.ClickException as e:
        click.echo(f"error: {_one_line(e.format_message())}", err=True)
        sys.exit(1)
    except MedlatentError as e:
        click.echo(f"error: {_one_line(str(e))}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
