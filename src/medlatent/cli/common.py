"""What every command module shares: flag value ranges, the training flags (one spelling per
idea), turning flags + ``--config`` + ``--set`` into a config mapping, and running a training
with a progress display (:mod:`medlatent.cli.display`). Nothing here decides a model's defaults: those live in its spec and are
applied by :func:`medlatent.api.make_config`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import click

from medlatent.cli import display
from medlatent.config import apply_set, load_yaml
from medlatent.errors import ConfigError

# Value ranges of flags, checked while parsing (config values are checked again by range).
POSITIVE = click.FloatRange(min=0, min_open=True)
NON_NEGATIVE = click.FloatRange(min=0)
COUNT = click.IntRange(min=1)
NON_NEGATIVE_INT = click.IntRange(min=0)
FRACTION = click.FloatRange(0, 1, min_open=True)
BATCH = click.IntRange(min=2)
SIDE = click.IntRange(min=8)

DATA_DIR_HELP = "Data folder (default: $MEDLATENT_DATA, else ~/.cache/medlatent)."

# Flags every training command takes, and the config key each sets.
TRAINING_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--data", "data.name", dict(multiple=True, callback=lambda ctx, param, value: list(value) or None,
                                 help="MedMNIST subset, .npz file, prepared store or image folder; repeat it to "
                                      "pretrain one encoder on the union of several (shares: --set "
                                      "data.weights=[2,1]). [default: bloodmnist]")),
    ("--epochs", "train.epochs", dict(type=POSITIVE, help="Epochs over the training split; fractions allowed.")),
    ("--batch-size", "train.batch_size", dict(type=BATCH, help="Global batch size. [default: the method's]")),
    ("--lr", "optim.lr", dict(type=POSITIVE, help="Peak learning rate for batch 256. [default: the method's]")),
    ("--size", "data.size", dict(type=SIDE, help="Image side in pixels. [default: the data's own; 28 for MedMNIST]")),
    ("--seed", "train.seed", dict(type=NON_NEGATIVE_INT)),
    ("--precision", "train.precision", dict(type=click.Choice(["auto", "fp32", "bf16"]))),
    ("--device", "train.device", dict(help="auto, cpu, cuda, cuda:1 ...")),
    ("--time-budget", "train.time_budget_s", dict(type=NON_NEGATIVE,
                                                  help="Stop (with a checkpoint) after this many seconds.")),
    ("--data-dir", "data.data_dir", dict(help=DATA_DIR_HELP)),
    ("--log", "train.log", dict(type=click.Choice(["tensorboard", "mlflow"]), multiple=True,
                                callback=lambda ctx, param, value: list(value) or None,
                                help="Also log to TensorBoard / MLflow, inside the run folder (repeatable; "
                                     "pip install 'medlatent[track]').")),
]
# Of those, the ones --resume accepts: they change where and how long a run goes on, not what it computes.
RESUMABLE = {"--device": "train.device", "--time-budget": "train.time_budget_s"}


def _param(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def training_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the shared training flags, ``--config``, ``--set``, ``--output`` and ``--resume``;
    the command receives them as ``flags`` (a dict by parameter name) plus its own options."""
    options = [click.option(flag, _param(flag), default=None, **kw) for flag, _, kw in TRAINING_FLAGS]
    options += [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                     help="YAML config; flags override it."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override any config key, e.g. views.crop_scale=[0.3,1] or method_options.temperature=0.1."),
        click.option("--output", default=None, help="Run folder. [default: runs/<data>-<method>-<time>]"),
        click.option("--resume", default=None, metavar="RUN",
                     help="Continue the run in this folder exactly where its last checkpoint left it."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def training_tree(kwargs: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``--config`` file, then the shared flags and the command's ``extra`` keys, then every
    ``--set``: the mapping :func:`medlatent.api.make_config` turns into the run's config."""
    tree: dict[str, Any] = load_yaml(kwargs["config_file"]) if kwargs.get("config_file") else {}
    given = {key: kwargs[_param(flag)] for flag, key, _ in TRAINING_FLAGS}
    names = given.pop("data.name")  # --data once: data.name; repeated: data.mixture (either replaces the file's)
    if names:
        given["data.name"], given["data.mixture"] = names[0], list(names) if len(names) > 1 else []
    for key, value in {**given, **extra}.items():
        if value is None:
            continue
        node = tree
        *sections, name = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {section} is not a section in {kwargs.get('config_file')}")
        node[name] = value
    for assignment in kwargs.get("sets") or ():
        apply_set(tree, assignment)
    return tree


def train(kwargs: dict[str, Any], extra: dict[str, Any], changing: dict[str, Any]) -> None:
    """A training command's body: resume the run named by ``--resume``, or build the config
    from the flags (``extra``: the command's own keys) and start a new run.

    ``changing``: the command's own flags that --resume must refuse (flag -> value given)."""
    from medlatent.api import make_config

    if kwargs.get("resume"):
        shared = {flag: kwargs[_param(flag)] for flag, _, _ in TRAINING_FLAGS if flag not in RESUMABLE}
        refused = {**shared, **changing, "--config": kwargs.get("config_file"), "--output": kwargs.get("output"),
                   "--set": kwargs.get("sets") or None}
        given = [flag for flag, value in refused.items() if value is not None]
        if given:
            raise ConfigError(f"--resume continues {kwargs['resume']} with its own config; {', '.join(given)} "
                              f"would change the run (only --device and --time-budget may be given)")
        overrides = {key: kwargs[_param(flag)] for flag, key in RESUMABLE.items() if kwargs[_param(flag)] is not None}
        if overrides:
            click.echo("resuming with " + ", ".join(f"{k} = {v}" for k, v in overrides.items()) +
                       " (these do not change what the run computes)")
        run_training(None, kwargs["resume"], True, overrides)
        return
    run_training(make_config(training_tree(kwargs, extra), kwargs.get("config_file") or "config"),
                 kwargs.get("output"), False)


def run_training(cfg: Any, output: str | None, resume: bool, overrides: dict[str, Any] | None = None) -> None:
    """Train with a progress bar (from the first step on) in a terminal, or plain progress
    lines (:class:`ProgressLines`) when stdout is a file or pipe; Ctrl-C or SIGTERM stops with
    a checkpoint (exit 130); says what to run next."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from medlatent import dist
    from medlatent.api import default_output, run_pretraining

    out = Path(output) if output else default_output(cfg)
    stop = {"asked": False}

    def ask_stop(signum: int, frame: Any) -> None:
        stop["asked"] = True

    main_process = int(os.environ.get("RANK", "0")) == 0  # torchrun sets RANK; only rank 0 draws
    terminal = sys.stdout.isatty()
    lines = display.ProgressLines(display.progress_seconds()) if main_process and not terminal else None
    signal.signal(signal.SIGINT, ask_stop)
    signal.signal(signal.SIGTERM, ask_stop)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[ips]:.0f} img/s"),
               TextColumn("ETA"), TimeRemainingColumn()]
    bar = Progress(*columns, disable=not (main_process and terminal), transient=False)
    task = None

    def on_progress(p: Any) -> None:  # the bar appears with the first step, not before
        nonlocal task
        if lines is not None:
            lines(p)
            return
        if task is None:
            bar.start()
            task = bar.add_task("pretrain", total=p.total_steps, loss=display._loss_text(p.loss), ips=p.images_per_s)
        bar.update(task, completed=p.step, total=p.total_steps, loss=display._loss_text(p.loss), ips=p.images_per_s,
                   description=f"epoch {p.epoch + 1}")

    display.TASKS.muted = True  # the training display says enough (maps drawn during training extract features)
    try:
        run, result = run_pretraining(cfg, out, resume, on_progress, lambda: stop["asked"], overrides)
    finally:
        display.TASKS.muted = False
        bar.stop()
        if lines is not None:
            lines.finish()
    if not dist.is_main():
        return
    click.echo(f"run: {run}  ({result.status} at step {result.step}/{result.total_steps}, {result.wall_s:.0f} s)")
    if result.status == "stopped":
        click.echo(f"stopped with a checkpoint; continue with: medlatent pretrain --resume {run}")
        sys.exit(130)
    if result.status == "budget":
        click.echo(f"time budget reached; continue with: medlatent pretrain --resume {run}")
    from medlatent.api import is_generative

    if cfg is not None and is_generative(cfg.method):
        click.echo(f"next: medlatent generate sample {run}")
    else:
        click.echo(f"next: medlatent probe {run}")


def renamed(new_value: Any, old_value: Any, old: str, new: str) -> Any:
    """The value of a flag given under its old name (with a deprecation warning) or its new one."""
    if old_value in (None, ()):
        return new_value
    logging.getLogger("medlatent").warning(f"{old} is deprecated and will be removed; use {new}")
    return old_value


def echo_written(*paths: Any) -> None:
    click.echo("written: " + ", ".join(str(p) for p in paths if p))
