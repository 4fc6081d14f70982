"""``medlatent anomaly``: detectors trained on normal images only, and their scores."""

from __future__ import annotations

from typing import Any

import click

from medlatent.cli.common import DATA_DIR_HELP, echo_written, renamed, train, training_command

DETECTORS = ("ae", "dae", "vae", "ddpm")  # the names of medlatent.anomaly.detectors.DETECTORS


@click.group()
def anomaly() -> None:
    """Anomaly detection from normal images only: fit a detector, score images."""


@anomaly.command("fit")
@click.option("--normal", default=None, help="Normal class(es), e.g. 0 or 0,1; training sees only these. [required]")
@click.option("--method", type=click.Choice(DETECTORS), default=None,
              help="Reconstruction detector: ae, dae, vae or ddpm. [default: ae]")
@click.option("--detector", "old_method", type=click.Choice(DETECTORS), default=None, hidden=True)
@training_command
def anomaly_fit(normal: str | None, method: str | None, old_method: str | None, **kwargs: Any) -> None:
    """Train a reconstruction detector (ae, dae, vae, ddpm) on the normal training images."""
    from medlatent.api import detector_method, parse_classes
    from medlatent.errors import ConfigError

    method = renamed(method, old_method, "--detector", "--method")
    if not kwargs.get("resume") and (normal is None or kwargs.get("data") is None):
        raise ConfigError("anomaly fit needs --data and --normal (the normal classes, e.g. 0 or 0,1)")
    classes = parse_classes(normal) if normal is not None else None
    train(kwargs, {"method": detector_method(method or "ae"), "data.classes": classes},
          {"--method": method, "--normal": normal})


@anomaly.command("score")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--detector", type=click.Choice(["auto", "knn"]), default="auto", show_default=True,
              help="auto: the run's reconstruction model; knn: feature distance with the run's encoder.")
@click.option("--data", "data_name", default=None, help="Data to score (default: the run's).")
@click.option("--normal", default=None, help="Normal class(es) (default: the classes the run was fitted on).")
@click.option("--score", type=click.Choice(["l2", "l1", "ssim"]), default="l2", show_default=True)
@click.option("--threshold", "rule", default="mean+3std", show_default=True, help="mean+Kstd or pQ on normal val scores.")
@click.option("--split", default="test", show_default=True)
@click.option("--out", default=None, help="Output folder (default: <run>/anomaly-<data>).")
@click.option("--data-dir", default=None, help=DATA_DIR_HELP)
@click.option("--device", default="auto", show_default=True)
def anomaly_score(run: str, detector: str, data_name: str | None, normal: str | None, score: str, rule: str,
                  split: str, out: str | None, data_dir: str | None, device: str) -> None:
    """Per-image scores (CSV) and heatmaps; AUROC, AUPRC, sensitivity and specificity at the threshold."""
    from medlatent.api import parse_classes, score_anomalies

    classes = parse_classes(normal) if normal else None
    r = score_anomalies(run, score, rule, detector, data_name, classes, split, out, data_dir, device)
    click.echo(f"{r['detector']} on {r['data']} {split} (normal: {r['normal']}; {r['n_anomalous']}/{r['n']} anomalous)")
    click.echo(f"AUROC {r['auroc']:.4f}  AUPRC {r['auprc']:.4f}; threshold {rule} = {r['threshold']:.4g}: "
               f"sensitivity {r['sensitivity']:.3f}, specificity {r['specificity']:.3f}")
    echo_written(r["scores_csv"], r.get("heatmaps"))
