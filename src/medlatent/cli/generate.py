"""``medlatent generate``: train, sample and judge generative models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from medlatent.cli.common import COUNT, DATA_DIR_HELP, FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, echo_written, \
    renamed, train, training_command

RUN = click.Path(file_okay=False)


@click.group()
def generate() -> None:
    """Generative models (vae, gan, ddpm, ldm): train, sample, evaluate, augment."""


@generate.command("train")
@click.option("--method", default=None, help="vae, gan, ddpm or ldm. [default: ddpm]")
@click.option("--model", "old_method", default=None, hidden=True)
@click.option("--conditional", is_flag=True, default=None, help="Condition on the class labels (guidance for ddpm/ldm).")
@training_command
def generate_train(method: str | None, old_method: str | None, conditional: bool | None, **kwargs: Any) -> None:
    """Train a generative model (checkpoints, exact resume and time budgets as for pretraining)."""
    from medlatent.api import generative_models
    from medlatent.errors import ConfigError

    method = renamed(method, old_method, "--model", "--method")
    name = method or "ddpm"
    if not kwargs.get("resume") and name not in generative_models():
        raise ConfigError(f"--method: unknown generative model '{name}' (known: {', '.join(generative_models())})")
    train(kwargs, {"method": name, "method_options.conditional": conditional},
          {"--method": method, "--conditional": conditional})


@generate.command("sample")
@click.argument("run", type=RUN)
@click.option("--n", type=COUNT, default=1000, show_default=True)
@click.option("--class", "class_index", type=NON_NEGATIVE_INT, default=None, help="Only this class (conditional models).")
@click.option("--guidance", type=NON_NEGATIVE, default=1.0, show_default=True,
              help="Classifier-free guidance scale (ddpm, ldm).")
@click.option("--steps", type=COUNT, default=50, show_default=True, help="DDIM steps (ddpm, ldm).")
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True)
@click.option("--out", default=None, help="Output .npz (default: <run>/samples-<model>[...].npz).")
@click.option("--device", default="auto", show_default=True)
def generate_sample(run: str, n: int, class_index: int | None, guidance: float, steps: int, seed: int,
                    out: str | None, device: str) -> None:
    """Write samples as an .npz in MedMNIST layout (usable as --data anywhere) and a PNG grid."""
    from medlatent.api import sample

    r = sample(run, n, class_index, guidance, steps, seed, out, device)
    click.echo(f"{r['n']} samples from step {r['step']} at {r['samples_per_s']:.1f} samples/s")
    echo_written(r["samples"], r["grid"])


@generate.command("evaluate")
@click.argument("run", type=RUN)
@click.option("--n", type=COUNT, default=1000, show_default=True, help="Samples to judge.")
@click.option("--guidance", type=NON_NEGATIVE, default=1.0, show_default=True)
@click.option("--steps", type=COUNT, default=50, show_default=True)
@click.option("--classifier-epochs", type=COUNT, default=15, show_default=True,
              help="Epochs of the domain classifier and of the TSTR/TRTR classifiers.")
@click.option("--classifier-min-steps", type=NON_NEGATIVE_INT, default=300, show_default=True)
@click.option("--data-dir", default=None, help=DATA_DIR_HELP)
@click.option("--device", default="auto", show_default=True)
def generate_evaluate(run: str, n: int, guidance: float, steps: int, classifier_epochs: int, classifier_min_steps: int,
                      data_dir: str | None, device: str) -> None:
    """Frechet distance and precision/recall in a domain encoder's features, TSTR vs TRTR,
    memorisation check with the closest pairs, per-class grid."""
    from medlatent.api import evaluate_samples

    r = evaluate_samples(run, n, guidance, steps, classifier_epochs, classifier_min_steps, data_dir, device)
    click.echo(f"features: {r['domain_encoder']}")
    click.echo(f"Frechet distance {r['frechet_distance']:.3f} (real train vs test: {r['frechet_distance_train_vs_test']:.3f}); "
               f"precision {r['precision']:.3f}, recall {r['recall']:.3f}; {r['samples_per_s']:.1f} samples/s")
    click.echo(f"memorisation: {r['memorisation']['share_below_half']:.1%} of samples closer than half the "
               f"median test-to-train distance (median ratio {r['memorisation']['median_ratio']:.2f})")
    if "tstr" in r:
        click.echo(f"TSTR ACC {r['tstr']['acc']:.4f} vs TRTR {r['trtr_same_n']['acc']:.4f} on "
                   f"{r['trtr_same_n_images']} real images ({r['tstr_over_trtr']:.2f} x); TRTR on all "
                   f"{r['trtr_full']['acc']:.4f}")
    echo_written(Path(run) / "generation_eval.json", r["memorisation_figure"], r["grid"])


@generate.command("augment")
@click.argument("run", type=RUN)
@click.option("--protocol", type=click.Choice(["fraction", "all-labels"]), default="fraction", show_default=True,
              help="fraction: per label fraction and seed, train a generator with RUN's config on the train images "
                   "and only that fraction's labels (the user's real setting). all-labels: RUN's own samples, "
                   "trained on every label (leaks labels; only to reproduce old numbers).")
@click.option("--label-fraction", "fractions", multiple=True, type=FRACTION, default=(0.01, 0.1), show_default=True)
@click.option("--fraction", "old_fractions", multiple=True, type=FRACTION, hidden=True)
@click.option("--n-synthetic", type=COUNT, default=2000, show_default=True)
@click.option("--seeds", type=COUNT, default=3, show_default=True)
@click.option("--guidance", type=NON_NEGATIVE, default=1.0, show_default=True)
@click.option("--steps", type=COUNT, default=50, show_default=True, help="DDIM steps (ddpm, ldm).")
@click.option("--classifier-epochs", type=COUNT, default=15, show_default=True)
@click.option("--classifier-min-steps", type=NON_NEGATIVE_INT, default=300, show_default=True)
@click.option("--generator-steps", type=COUNT, default=None,
              help="--protocol fraction: optimiser steps of each generator. [default: as many as RUN trained]")
@click.option("--generator-budget", "generator_budget_s", type=NON_NEGATIVE, default=None,
              help="--protocol fraction: seconds of training per generator, 0 for no limit. [default: 600]")
@click.option("--data-dir", default=None, help=DATA_DIR_HELP)
@click.option("--device", default="auto", show_default=True)
def generate_augment(run: str, protocol: str, fractions: tuple[float, ...], old_fractions: tuple[float, ...],
                     n_synthetic: int, seeds: int, guidance: float, steps: int, classifier_epochs: int,
                     classifier_min_steps: int,
                     generator_steps: int | None, generator_budget_s: float | None, data_dir: str | None,
                     device: str) -> None:
    """A classifier on a label fraction alone vs with class-conditional samples added, and the
    gain over seeds. By default each fraction's generator sees only that fraction's labels."""
    from medlatent.api import synthetic_augmentation

    fractions = renamed(fractions, old_fractions, "--fraction", "--label-fraction")
    r = synthetic_augmentation(run, fractions, n_synthetic, tuple(range(seeds)), guidance, classifier_epochs,
                               classifier_min_steps, data_dir, device, protocol, generator_steps, generator_budget_s,
                               steps)
    for row in r["summary"]:
        click.echo(f"{row['fraction']:>6.0%} {row['training']:17} test ACC {row['acc']:.4f} ± {row['acc_std']:.4f}  "
                   f"AUC {row['auc']:.4f} ± {row['auc_std']:.4f}")
    for g in r["gains"]:
        seen = "/".join(str(n) for n in dict.fromkeys(g["labels_seen"]))
        click.echo(f"{g['fraction']:>6.0%} gain ACC {g['acc_gain']:+.4f} ± {g['acc_gain_std']:.4f}  "
                   f"AUC {g['auc_gain']:+.4f} ± {g['auc_gain_std']:.4f}  (protocol {g['protocol']}: the generator "
                   f"saw {seen} labels{'; LEAKS labels' if g['leaks_labels'] else ''})")
    echo_written(r["file"])
