"""``medlatent``: the command-line tool.

Every problem a user can fix (bad file, unknown key, missing checkpoint, diverged loss) is
printed as one ``error:`` line with a non-zero exit. Heavy modules (torch, MONAI) are imported
inside the commands, so ``medlatent --help`` answers at once.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from medlatent import __version__
from medlatent.config import apply_set
from medlatent.errors import MedlatentError

# Value ranges of flags, checked while parsing (config values are checked again by range).
POSITIVE = click.FloatRange(min=0, min_open=True)
NON_NEGATIVE = click.FloatRange(min=0)
COUNT = click.IntRange(min=1)
NON_NEGATIVE_INT = click.IntRange(min=0)
FRACTION = click.FloatRange(0, 1, min_open=True)
BATCH = click.IntRange(min=2)
SIDE = click.IntRange(min=8)


@click.group(context_settings=dict(help_option_names=["-h", "--help"], max_content_width=100))
@click.version_option(__version__, prog_name="medlatent")
def cli() -> None:
    """Label-efficient learning on biomedical images: self-supervised encoders and their probes."""


# ------------------------------------------------------------------------------------ data


@cli.group()
def data() -> None:
    """MedMNIST catalogue and downloads."""


@data.command("list")
@click.option("--data-dir", default=None, help="Data folder (default: $MEDLATENT_DATA, else ~/.cache/medlatent).")
def data_list(data_dir: str | None) -> None:
    """Every MedMNIST subset: task, classes, size, licence, and whether it is here (28 px)."""
    from medlatent.data.catalogue import CATALOGUE
    from medlatent.data.download import data_root, is_present

    root = data_root(data_dir)
    rows = [("name", "dims", "task", "classes", "ch", "train/val/test", "licence", "local")]
    for info in CATALOGUE.values():
        rows.append((info.name, f"{info.spatial_dims}-D", info.task, str(info.n_classes), str(info.channels),
                     "/".join(str(info.splits[s]) for s in ("train", "val", "test")), info.licence,
                     "yes" if is_present(info, 28, data_dir) else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    click.echo(f"\ndata folder: {root}   (sizes: 2-D 28/64/128/224 px, 3-D 28/64)")


@data.command("download")
@click.argument("names", nargs=-1, required=True)
@click.option("--size", default=28, show_default=True, help="Image side: 28, 64, 128 or 224.")
@click.option("--data-dir", default=None, help="Data folder (default: $MEDLATENT_DATA, else ~/.cache/medlatent).")
def data_download(names: tuple[str, ...], size: int, data_dir: str | None) -> None:
    """Fetch official MedMNIST files (md5-verified; a file already here is verified, not fetched)."""
    from medlatent.data.catalogue import get_info
    from medlatent.data.download import fetch

    for name in names:
        path = fetch(get_info(name), size, data_dir)
        click.echo(f"{name}: {path} (md5 ok)")


# ------------------------------------------------------------------------------- pretrain


@cli.command()
@click.option("--data", "data_name", default=None, help="MedMNIST subset, .npz file or image folder. [default: bloodmnist]")
@click.option("--method", default=None, help="simclr, mocov2, mocov3, byol, dino, mae, ijepa, rotation, autoencoder, denoising-autoencoder. [default: simclr]")
@click.option("--backbone", default=None, help="resnet18, resnet18-half, resnet18-quarter, vit-tiny, vit-small. [default: resnet18-quarter]")
@click.option("--epochs", type=POSITIVE, default=None,
              help="Epochs over the training split; fractions allowed. [default: 30]")
@click.option("--batch-size", type=BATCH, default=None, help="Global batch size. [default: 256]")
@click.option("--lr", type=POSITIVE, default=None, help="Peak learning rate for batch 256.")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd", "lars"]), default=None)
@click.option("--size", type=SIDE, default=None, help="Image side in pixels. [default: 28]")
@click.option("--seed", type=NON_NEGATIVE_INT, default=None)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None)
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the encoder.")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--time-budget", type=NON_NEGATIVE, default=None, help="Stop (with a checkpoint) after this many seconds.")
@click.option("--data-dir", default=None, help="Data folder (default: $MEDLATENT_DATA, else ~/.cache/medlatent).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, help="YAML config; flags override it.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key, e.g. views.crop_scale=[0.3,1] or method_options.temperature=0.1.")
@click.option("--output", default=None, help="Run folder. [default: runs/<data>-<method>-<time>]")
@click.option("--resume", "resume", default=None, metavar="RUN", help="Continue the run in this folder exactly where its last checkpoint left it.")
def pretrain(data_name: str | None, method: str | None, backbone: str | None, epochs: float | None,
             batch_size: int | None, lr: float | None, optimizer: str | None, size: int | None,
             seed: int | None, precision: str | None, compile_: bool | None, device: str | None,
             time_budget: float | None, data_dir: str | None, config_file: str | None,
             sets: tuple[str, ...], output: str | None, resume: str | None) -> None:
    """Learn an encoder from unlabelled images (labels are never read)."""
    from medlatent.config import PretrainConfig, from_dict, load_yaml

    if resume:
        changing = {"--data": data_name, "--method": method, "--backbone": backbone, "--epochs": epochs,
                    "--batch-size": batch_size, "--lr": lr, "--optimizer": optimizer, "--size": size,
                    "--seed": seed, "--precision": precision, "--compile/--no-compile": compile_,
                    "--data-dir": data_dir, "--config": config_file, "--output": output, "--set": sets or None}
        _resume(resume, changing, {"train.device": device, "train.time_budget_s": time_budget})
        return
    else:
        tree: dict[str, Any] = load_yaml(config_file) if config_file else {}
        flags = {"data.name": data_name, "method": method, "backbone.name": backbone, "train.epochs": epochs,
                 "train.batch_size": batch_size, "optim.lr": lr, "optim.name": optimizer, "data.size": size,
                 "train.seed": seed, "train.precision": precision, "train.compile": compile_,
                 "train.device": device, "train.time_budget_s": time_budget, "data.data_dir": data_dir}
        for key, value in flags.items():
            if value is not None:
                section, *rest = key.split(".")
                if rest:
                    tree.setdefault(section, {})[rest[0]] = value
                else:
                    tree[section] = value
        for s in sets:
            apply_set(tree, s)
        cfg = from_dict(PretrainConfig, tree, config_file or "config")
        out = output
    _run_pretraining(cfg, out, bool(resume))


def _resume(run: str, changing: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Continue ``run``: refuse flags that would change it, apply those that cannot."""
    from medlatent.errors import ConfigError

    given = [flag for flag, value in changing.items() if value is not None]
    if given:
        raise ConfigError(f"--resume continues {run} with its own config; {', '.join(given)} would change the "
                          f"run (only --device and --time-budget may be given)")
    kept = {k: v for k, v in overrides.items() if v is not None}
    if kept:
        click.echo("resuming with " + ", ".join(f"{k} = {v}" for k, v in kept.items()) +
                   " (these do not change what the run computes)")
    _run_pretraining(None, run, True, kept)


def _run_pretraining(cfg: Any, output: str | None, resume: bool, overrides: dict[str, Any] | None = None) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from medlatent import dist
    from medlatent.api import default_output, run_pretraining

    out = Path(output) if output else default_output(cfg)
    stop = {"asked": False}

    def ask_stop(signum: int, frame: Any) -> None:
        stop["asked"] = True

    signal.signal(signal.SIGINT, ask_stop)
    signal.signal(signal.SIGTERM, ask_stop)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.0f} img/s"),
               TextColumn("ETA"), TimeRemainingColumn()]
    main_process = int(os.environ.get("RANK", "0")) == 0  # torchrun sets RANK; only rank 0 draws
    bar = Progress(*columns, disable=not main_process, transient=False)
    task = None

    def on_progress(p: Any) -> None:  # the bar appears with the first step, not before
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("pretrain", total=p.total_steps, loss=p.loss, ips=p.images_per_s)
        bar.update(task, completed=p.step, total=p.total_steps, loss=p.loss, ips=p.images_per_s,
                   description=f"epoch {p.epoch + 1}")

    try:
        run, result = run_pretraining(cfg, out, resume, on_progress, lambda: stop["asked"], overrides)
    finally:
        bar.stop()
    if not dist.is_main():
        return
    click.echo(f"run: {run}  ({result.status} at step {result.step}/{result.total_steps}, {result.wall_s:.0f} s)")
    if result.status == "stopped":
        click.echo(f"stopped with a checkpoint; continue with: medlatent pretrain --resume {run}")
        sys.exit(130)
    if result.status == "budget":
        click.echo(f"time budget reached; continue with: medlatent pretrain --resume {run}")
    from medlatent.ssl.registry import GENERATIVE

    if cfg is not None and cfg.method in GENERATIVE:
        click.echo(f"next: medlatent generate sample {run}")
    else:
        click.echo(f"next: medlatent probe {run}")


# ------------------------------------------------------------------------------ generative

# Per-model training defaults (flags and --set override them): learning rate for batch 256,
# no weight decay, gradient clipping for the likelihood models; the GAN's Adam beta1 = 0.5.
GENERATIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "vae": {"optim": {"lr": 2e-3, "weight_decay": 0.0, "warmup_epochs": 1.0, "clip_grad_norm": 100.0}},
    "gan": {"optim": {"lr": 4e-4, "weight_decay": 0.0, "warmup_epochs": 0.0, "clip_grad_norm": None,
                      "betas": [0.5, 0.999], "final_lr_fraction": 1.0}},
    "ddpm": {"optim": {"lr": 4e-4, "weight_decay": 0.0, "warmup_epochs": 1.0, "clip_grad_norm": 1.0}},
    "ldm": {"optim": {"lr": 4e-4, "weight_decay": 0.0, "warmup_epochs": 1.0, "clip_grad_norm": 1.0}},
}


@cli.group()
def generate() -> None:
    """Generative models (vae, gan, ddpm, ldm): train, sample, evaluate, augment."""


@generate.command("train")
@click.option("--model", default=None, help="vae, gan, ddpm or ldm. [default: ddpm]")
@click.option("--data", "data_name", default=None, help="MedMNIST subset, .npz file or image folder. [default: bloodmnist]")
@click.option("--conditional", is_flag=True, default=None, help="Condition on the class labels (guidance for ddpm/ldm).")
@click.option("--epochs", type=POSITIVE, default=None,
              help="Epochs over the training split; fractions allowed. [default: 30]")
@click.option("--batch-size", type=BATCH, default=None, help="[default: 128]")
@click.option("--lr", type=POSITIVE, default=None, help="Peak learning rate for batch 256.")
@click.option("--size", type=SIDE, default=None, help="Image side in pixels. [default: 28]")
@click.option("--seed", type=NON_NEGATIVE_INT, default=None)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None)
@click.option("--device", default=None)
@click.option("--time-budget", type=NON_NEGATIVE, default=None, help="Stop (with a checkpoint) after this many seconds.")
@click.option("--data-dir", default=None)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="e.g. method_options.schedule.kind=linear")
@click.option("--output", default=None, help="Run folder. [default: runs/<data>-<model>-<time>]")
@click.option("--resume", default=None, metavar="RUN", help="Continue this run from its last checkpoint.")
def generate_train(model: str | None, data_name: str | None, conditional: bool | None, epochs: float | None,
                   batch_size: int | None, lr: float | None, size: int | None, seed: int | None,
                   precision: str | None, device: str | None, time_budget: float | None, data_dir: str | None,
                   sets: tuple[str, ...], output: str | None, resume: str | None) -> None:
    """Train a generative model (checkpoints, exact resume and time budgets as for pretraining)."""
    from medlatent.config import PretrainConfig, from_dict
    from medlatent.errors import ConfigError
    from medlatent.ssl.registry import GENERATIVE

    if resume:
        changing = {"--model": model, "--data": data_name, "--conditional": conditional, "--epochs": epochs,
                    "--batch-size": batch_size, "--lr": lr, "--size": size, "--seed": seed,
                    "--precision": precision, "--data-dir": data_dir, "--output": output, "--set": sets or None}
        _resume(resume, changing, {"train.device": device, "train.time_budget_s": time_budget})
        return
    name = model or "ddpm"
    if name not in GENERATIVE:
        raise ConfigError(f"--model: unknown generative model '{name}' (known: {', '.join(GENERATIVE)})")
    import copy

    tree: dict[str, Any] = copy.deepcopy(GENERATIVE_DEFAULTS[name])
    tree["method"] = name
    tree.setdefault("train", {})["batch_size"] = 128
    flags = {"data.name": data_name, "train.epochs": epochs, "train.batch_size": batch_size, "optim.lr": lr,
             "data.size": size, "train.seed": seed, "train.precision": precision, "train.device": device,
             "train.time_budget_s": time_budget, "data.data_dir": data_dir,
             "method_options.conditional": conditional}
    for key, value in flags.items():
        if value is not None:
            section, sub = key.split(".")
            tree.setdefault(section, {})[sub] = value
    for s in sets:
        apply_set(tree, s)
    _run_pretraining(from_dict(PretrainConfig, tree, "config"), output, False)


@generate.command("sample")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--n", type=COUNT, default=1000, show_default=True)
@click.option("--class", "class_index", type=NON_NEGATIVE_INT, default=None, help="Only this class (conditional models).")
@click.option("--guidance", type=NON_NEGATIVE, default=1.0, show_default=True, help="Classifier-free guidance scale (ddpm, ldm).")
@click.option("--steps", type=COUNT, default=50, show_default=True, help="DDIM steps (ddpm, ldm).")
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True)
@click.option("--out", default=None, help="Output .npz (default: <run>/samples-<model>[...].npz).")
@click.option("--device", default="auto", show_default=True)
def generate_sample(run: str, n: int, class_index: int | None, guidance: float, steps: int, seed: int,
                    out: str | None, device: str) -> None:
    """Write samples as an .npz in MedMNIST layout (usable as --data anywhere) and a PNG grid."""
    from medlatent.generative.evaluate import sample_run

    r = sample_run(run, n, class_index, guidance, steps, seed, out, device)
    click.echo(f"{r['n']} samples from step {r['step']} at {r['samples_per_s']:.1f} samples/s")
    click.echo(f"written: {r['samples']}, {r['grid']}")


@generate.command("evaluate")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--n", type=COUNT, default=1000, show_default=True, help="Samples to judge.")
@click.option("--guidance", type=NON_NEGATIVE, default=1.0, show_default=True)
@click.option("--steps", type=COUNT, default=50, show_default=True)
@click.option("--classifier-epochs", type=COUNT, default=15, show_default=True,
              help="Epochs of the domain classifier and of the TSTR/TRTR classifiers.")
@click.option("--classifier-min-steps", type=NON_NEGATIVE_INT, default=300, show_default=True)
@click.option("--data-dir", default=None)
@click.option("--device", default="auto", show_default=True)
def generate_evaluate(run: str, n: int, guidance: float, steps: int, classifier_epochs: int, classifier_min_steps: int,
                      data_dir: str | None, device: str) -> None:
    """Frechet distance and precision/recall in a domain encoder's features, TSTR vs TRTR,
    memorisation check with the closest pairs, per-class grid."""
    from medlatent.generative.evaluate import evaluate_run

    r = evaluate_run(run, n, guidance, steps, 0, classifier_epochs, data_dir, device, classifier_min_steps)
    click.echo(f"features: {r['domain_encoder']}")
    click.echo(f"Frechet distance {r['frechet_distance']:.3f} (real train vs test: {r['frechet_distance_train_vs_test']:.3f}); "
               f"precision {r['precision']:.3f}, recall {r['recall']:.3f}; {r['samples_per_s']:.1f} samples/s")
    click.echo(f"memorisation: {r['memorisation']['share_below_half']:.1%} of samples closer than half the "
               f"median test-to-train distance (median ratio {r['memorisation']['median_ratio']:.2f})")
    if "tstr" in r:
        click.echo(f"TSTR ACC {r['tstr']['acc']:.4f} vs TRTR {r['trtr_same_n']['acc']:.4f} on "
                   f"{r['trtr_same_n_images']} real images ({r['tstr_over_trtr']:.2f} x); TRTR on all "
                   f"{r['trtr_full']['acc']:.4f}")
    click.echo(f"written: {Path(run) / 'generation_eval.json'}, {r['memorisation_figure']}, {r['grid']}")


@generate.command("augment")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--fraction", "fractions", multiple=True, type=FRACTION, default=(0.01, 0.1), show_default=True)
@click.option("--n-synthetic", type=COUNT, default=2000, show_default=True)
@click.option("--seeds", type=COUNT, default=3, show_default=True)
@click.option("--guidance", type=NON_NEGATIVE, default=1.0, show_default=True)
@click.option("--classifier-epochs", type=COUNT, default=15, show_default=True)
@click.option("--classifier-min-steps", type=NON_NEGATIVE_INT, default=300, show_default=True)
@click.option("--data-dir", default=None)
@click.option("--device", default="auto", show_default=True)
def generate_augment(run: str, fractions: tuple[float, ...], n_synthetic: int, seeds: int, guidance: float,
                     classifier_epochs: int, classifier_min_steps: int, data_dir: str | None, device: str) -> None:
    """A classifier on a label fraction alone vs with class-conditional samples added."""
    from medlatent.generative.evaluate import augment_experiment

    r = augment_experiment(run, fractions, n_synthetic, tuple(range(seeds)), guidance, 50, classifier_epochs,
                           data_dir, device, classifier_min_steps)
    for row in r["summary"]:
        click.echo(f"{row['fraction']:>6.0%} {row['training']:17} test ACC {row['acc']:.4f} ± {row['acc_std']:.4f}  "
                   f"AUC {row['auc']:.4f} ± {row['auc_std']:.4f}")
    click.echo(f"written: {Path(run) / 'synthetic_augmentation.json'}")


# -------------------------------------------------------------------------------- anomaly

DETECTOR_METHODS = {"ae": "autoencoder", "dae": "denoising-autoencoder", "vae": "vae", "ddpm": "ddpm"}


def _classes(text: str) -> list[int]:
    from medlatent.errors import ConfigError

    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--normal {text}: expected class indices such as 0 or 0,1") from None


@cli.group()
def anomaly() -> None:
    """Anomaly detection from normal images only: fit a detector, score images."""


@anomaly.command("fit")
@click.option("--data", "data_name", required=True, help="MedMNIST subset, .npz or folder (labelled).")
@click.option("--normal", required=True, help="Normal class(es), e.g. 0 or 0,1; training sees only these.")
@click.option("--detector", type=click.Choice(list(DETECTOR_METHODS)), default="ae", show_default=True)
@click.option("--epochs", type=POSITIVE, default=30, show_default=True, help="Fractions allowed.")
@click.option("--batch-size", type=BATCH, default=None)
@click.option("--time-budget", type=NON_NEGATIVE, default=None)
@click.option("--data-dir", default=None)
@click.option("--device", default=None)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE")
@click.option("--output", default=None)
def anomaly_fit(data_name: str, normal: str, detector: str, epochs: float, batch_size: int | None,
                time_budget: float | None, data_dir: str | None, device: str | None, sets: tuple[str, ...],
                output: str | None) -> None:
    """Train a reconstruction detector (ae, dae, vae, ddpm) on the normal training images."""
    import copy

    from medlatent.config import PretrainConfig, from_dict

    method = DETECTOR_METHODS[detector]
    tree: dict[str, Any] = copy.deepcopy(GENERATIVE_DEFAULTS.get(method, {}))
    tree["method"] = method
    tree["data"] = {"name": data_name, "classes": _classes(normal), "data_dir": data_dir}
    tree["train"] = {"epochs": epochs, **({"batch_size": batch_size} if batch_size else {}),
                     **({"time_budget_s": time_budget} if time_budget else {}), **({"device": device} if device else {})}
    for s in sets:
        apply_set(tree, s)
    _run_pretraining(from_dict(PretrainConfig, tree, "config"), output, False)


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
@click.option("--data-dir", default=None)
@click.option("--device", default="auto", show_default=True)
def anomaly_score(run: str, detector: str, data_name: str | None, normal: str | None, score: str, rule: str,
                  split: str, out: str | None, data_dir: str | None, device: str) -> None:
    """Per-image scores (CSV) and heatmaps; AUROC, AUPRC, sensitivity and specificity at the threshold."""
    import dataclasses

    from medlatent.anomaly.detectors import AnomalyConfig, evaluate_detector, write_outputs
    from medlatent.anomaly.thresholds import parse_rule
    from medlatent.data.sources import load_dataset
    from medlatent.errors import ConfigError
    from medlatent.train.precision import resolve_device
    from medlatent.train.runs import RunDir

    try:
        parse_rule(rule)
    except ValueError as e:
        raise ConfigError(f"--threshold: {e}") from None
    cfg_run = RunDir(Path(run)).read_config()
    classes = _classes(normal) if normal else cfg_run.data.classes
    if not classes:
        raise ConfigError(f"{run}: was not fitted on chosen normal classes; give --normal")
    data = load_dataset(dataclasses.replace(cfg_run.data, name=data_name or cfg_run.data.name,
                                            data_dir=data_dir if data_dir is not None else cfg_run.data.data_dir))
    r = evaluate_detector(run, data, classes, AnomalyConfig(score=score, threshold=rule), detector, split,
                          resolve_device(device))
    r = write_outputs(r, data.split(split).images, Path(out) if out else Path(run) / f"anomaly-{data.name}")
    click.echo(f"{r['detector']} on {r['data']} {split} (normal: {classes}; {r['n_anomalous']}/{r['n']} anomalous)")
    click.echo(f"AUROC {r['auroc']:.4f}  AUPRC {r['auprc']:.4f}; threshold {rule} = {r['threshold']:.4g}: "
               f"sensitivity {r['sensitivity']:.3f}, specificity {r['specificity']:.3f}")
    click.echo(f"written: {r['scores_csv']}" + (f", {r['heatmaps']}" if "heatmaps" in r else ""))


# ---------------------------------------------------------------------------- restoration


@cli.group()
def restore() -> None:
    """Restoration: denoising, low-dose (Poisson), undersampled k-space, inpainting."""


@restore.command("train")
@click.option("--task", type=click.Choice(["denoise", "poisson", "kspace", "inpaint"]), default="denoise",
              show_default=True)
@click.option("--model", type=click.Choice(["unet", "diffusion"]), default="unet", show_default=True,
              help="unet: supervised residual UNet; diffusion: conditional (paired) diffusion, Palette-style.")
@click.option("--data", "data_name", default=None, help="Clean images: MedMNIST subset, .npz or folder.")
@click.option("--epochs", type=POSITIVE, default=20, show_default=True, help="Fractions allowed.")
@click.option("--batch-size", type=BATCH, default=128, show_default=True)
@click.option("--time-budget", type=NON_NEGATIVE, default=None)
@click.option("--data-dir", default=None)
@click.option("--device", default=None)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="e.g. method_options.sigmas=[0.1,0.2]")
@click.option("--output", default=None)
def restore_train(task: str, model: str, data_name: str | None, epochs: float, batch_size: int, time_budget: float | None,
                  data_dir: str | None, device: str | None, sets: tuple[str, ...], output: str | None) -> None:
    """Train a UNet (or a conditional diffusion model) to undo a simulated degradation of clean
    images, drawn fresh at every step."""
    from medlatent.config import PretrainConfig, from_dict

    unet = model == "unet"
    tree: dict[str, Any] = {"method": "restore" if unet else "restore-diffusion",
                            "method_options": {"task": task} if unet else {"restore": {"task": task}},
                            "optim": {"lr": 2e-3 if unet else 4e-4, "weight_decay": 0.0, "warmup_epochs": 1.0,
                                      "clip_grad_norm": None if unet else 1.0},
                            "train": {"epochs": epochs, "batch_size": batch_size,
                                      **({"time_budget_s": time_budget} if time_budget else {}),
                                      **({"device": device} if device else {})},
                            "data": {k: v for k, v in dict(name=data_name, data_dir=data_dir).items() if v}}
    for s in sets:
        apply_set(tree, s)
    _run_pretraining(from_dict(PretrainConfig, tree, "config"), output, False)


@restore.command("evaluate")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--diffusion", "diffusion_run", default=None, type=click.Path(file_okay=False),
              help="A ddpm run trained on clean images of the same data: adds diffusion restoration.")
@click.option("--autoencoder", "autoencoder_run", default=None, type=click.Path(file_okay=False),
              help="A (denoising-)autoencoder run on clean images of the same data: adds its row (noise tasks).")
@click.option("--n", type=COUNT, default=500, show_default=True, help="Test images.")
@click.option("--steps", type=COUNT, default=20, show_default=True, help="DDIM steps (x2 for consistency sampling).")
@click.option("--data-dir", default=None)
@click.option("--device", default="auto", show_default=True)
def restore_evaluate(run: str, diffusion_run: str | None, autoencoder_run: str | None, n: int, steps: int,
                     data_dir: str | None, device: str) -> None:
    """PSNR and SSIM per degradation level: degraded input, UNet (+ data consistency), classical
    filters (scikit-image) and diffusion."""
    from medlatent.restore.evaluate import evaluate_run

    r = evaluate_run(run, diffusion_run, n, steps, data_dir, device, autoencoder_run)
    click.echo(f"{r['data']} test, {r['n_images']} images")
    click.echo(f"{'level':14} {'method':30} {'PSNR':>7} {'SSIM':>6}")
    for row in r["rows"]:
        click.echo(f"{row['level_name']:14} {row['method']:30} {row['psnr']:7.2f} {row['ssim']:6.3f}")
    click.echo(f"written: {Path(run) / 'restore_eval.json'}, {r['figure']}")


@restore.command("rate-distortion")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--n", type=COUNT, default=500, show_default=True, help="Test images.")
@click.option("--out", default="rate_distortion.png", show_default=True, help="Plot (a .json is written beside it).")
@click.option("--data-dir", default=None)
def restore_rate_distortion(runs: tuple[str, ...], n: int, out: str, data_dir: str | None) -> None:
    """Autoencoder runs (any latent sizes) against JPEG at the same bytes: PSNR/SSIM vs bytes."""
    import dataclasses
    import json

    from medlatent.data.sources import load_dataset
    from medlatent.data.store import to_float
    from medlatent.report.figures import rate_distortion_figure
    from medlatent.restore.compression import autoencoder_point, jpeg_curve, load_autoencoder
    from medlatent.train.runs import RunDir

    rows, data = [], None
    for run in runs:
        method, meta = load_autoencoder(run, "cpu")
        if data is None:
            cfg = RunDir(Path(run)).read_config()
            data = load_dataset(dataclasses.replace(cfg.data, data_dir=data_dir or cfg.data.data_dir))
            images = to_float(data.split("test").images[:n])
        rows.append(dict(autoencoder_point(method, images, meta["mean"], meta["std"]), run=run))
    rows += jpeg_curve(images)
    for r in sorted(rows, key=lambda r: (r["codec"] == "JPEG", r["bytes"])):
        extra = f" (file {r['file_bytes']:.0f} B)" if "file_bytes" in r else ""
        click.echo(f"{r['codec']:28} q{r.get('quality', '-')!s:>3} {r['bytes']:7.1f} B{extra:16}  PSNR {r['psnr']:6.2f}  "
                   f"SSIM {r['ssim']:.3f}")
    path = rate_distortion_figure(rows, f"{data.name} test ({len(images)} images): rate-distortion", Path(out))
    Path(out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    click.echo(f"written: {path}, {Path(out).with_suffix('.json')}")


# ---------------------------------------------------------------------------- evaluation


@cli.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--data", "data_name", default=None, help="Labelled data to probe on (default: the pretraining data).")
@click.option("--split", "splits", multiple=True, default=("val", "test"), show_default=True)
@click.option("--label-fraction", "fractions", multiple=True, type=FRACTION, default=(1.0,), show_default=True,
              help="Fraction of training labels (repeatable: 0.01 0.1 1).")
@click.option("--seeds", type=COUNT, default=1, show_default=True, help="Label-subset draws per fraction < 1.")
@click.option("--k", type=COUNT, default=20, show_default=True, help="Neighbours for k-NN.")
@click.option("--data-dir", default=None)
@click.option("--device", default="auto", show_default=True)
def probe(run: str, data_name: str | None, splits: tuple[str, ...], fractions: tuple[float, ...], seeds: int,
          k: int, data_dir: str | None, device: str) -> None:
    """k-NN and linear probe of a run's encoder: ACC and AUC as MedMNIST reports them."""
    from medlatent.api import probe as run_probe

    result = run_probe(run, data_name, splits, fractions, tuple(range(seeds)), k, data_dir, device)
    click.echo(f"{result['data']} ({result['task']}), encoder at step {result['encoder_step']}")
    click.echo(f"{'protocol':8} {'split':5} {'labels':>7}  {'ACC':>6}  {'AUC':>6}  {'bal.ACC':>7}")
    for r in result["summary"]:
        sd = f" ±{r['acc_std']:.3f}" if r["n_seeds"] > 1 else ""
        click.echo(f"{r['protocol']:8} {r['split']:5} {r['fraction']:>7.0%}  {r['acc']:.4f}  {r['auc']:.4f}  "
                   f"{r['balanced_acc']:.4f}{sd}")
    click.echo(f"written: {Path(run) / 'probe.json'}")


@cli.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--split", default="test", show_default=True)
@click.option("--out", default=None, help="Output .npz (default: <run>/embeddings-<split>.npz).")
@click.option("--data", "data_name", default=None, help="Images to embed (default: the pretraining data).")
@click.option("--data-dir", default=None)
@click.option("--device", default="auto", show_default=True)
def embed(run: str, split: str, out: str | None, data_name: str | None, data_dir: str | None, device: str) -> None:
    """Write a split's embeddings (and labels) to an .npz for your own analysis."""
    from medlatent.api import embed as run_embed

    path = run_embed(run, split, out, data_name, data_dir, device)
    click.echo(f"written: {path}")


@cli.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--fraction", "fractions", multiple=True, type=FRACTION, default=(0.01, 0.1, 0.25, 1.0), show_default=True,
              help="Fractions of the training labels (repeatable).")
@click.option("--seeds", type=COUNT, default=3, show_default=True, help="Label-subset draws per fraction (one at 100 %%: the same labels).")
@click.option("--protocol", "protocols", multiple=True, default=("knn", "linear", "finetune", "supervised"),
              show_default=True, help="knn, linear, finetune (the pretrained encoder) and supervised (from scratch).")
@click.option("--epochs", type=COUNT, default=None, help="Most fine-tuning epochs (default 30; early stopping on val).")
@click.option("--min-steps", type=NON_NEGATIVE_INT, default=None,
              help="Fewest fine-tuning steps, so small label fractions still train (default 300).")
@click.option("--data", "data_name", default=None, help="Labelled data (default: the pretraining data).")
@click.option("--data-dir", default=None)
@click.option("--device", default="auto", show_default=True)
def efficiency(run: str, fractions: tuple[float, ...], seeds: int, protocols: tuple[str, ...], epochs: int | None,
               min_steps: int | None, data_name: str | None, data_dir: str | None, device: str) -> None:
    """Label-efficiency curves: k-NN, linear probe, fine-tuning and the supervised baseline at
    several label fractions and seeds (mean and std), with a plot."""
    from medlatent.api import label_efficiency
    from medlatent.eval.finetune import FinetuneConfig

    given = dict(epochs=epochs, min_steps=min_steps)
    cfg = FinetuneConfig(**{k: v for k, v in given.items() if v is not None})

    def progress(fraction: float, seed: int) -> None:
        click.echo(f"  {fraction:.0%} of the labels, seed {seed}: done")

    result = label_efficiency(run, fractions, tuple(range(seeds)), protocols, cfg, data_name, data_dir, device, progress)
    click.echo(f"{'protocol':10} {'labels':>7}  {'test ACC':>15}  {'test AUC':>15}")
    for r in sorted(result["summary"], key=lambda r: (r["protocol"], r["fraction"])):
        click.echo(f"{r['protocol']:10} {r['fraction']:>7.0%}  {r['acc']:.4f} ± {r['acc_std']:.4f}  "
                   f"{r['auc']:.4f} ± {r['auc_std']:.4f}")
    from medlatent.eval.session import crossover_words

    for protocol, c in result["crossover"].items():
        if c is not None:
            click.echo(f"{protocol} vs training from scratch: {crossover_words(c)}")
    click.echo(f"written: {Path(run) / 'label_efficiency.json'}, {Path(run) / 'label_efficiency.png'}")


@cli.command("map")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--split", default="test", show_default=True)
@click.option("--max-points", type=click.IntRange(min=2), default=2000, show_default=True)
@click.option("--out", default=None, help="PNG to write (default: <run>/embedding_map_<split>.png).")
@click.option("--data-dir", default=None)
def map_(run: str, split: str, max_points: int, out: str | None, data_dir: str | None) -> None:
    """2-D map of the embedding (UMAP if installed, else t-SNE), coloured by label, with thumbnails."""
    from medlatent.eval.session import RunEvaluation

    ev = RunEvaluation(run, None, data_dir, need_labels=False)
    click.echo(f"written: {ev.embedding_map(split, max_points, out=out)}")


@cli.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--k", type=COUNT, default=8, show_default=True, help="Neighbours shown per query.")
@click.option("--queries", type=COUNT, default=6, show_default=True)
@click.option("--data-dir", default=None)
def retrieve(run: str, k: int, queries: int, data_dir: str | None) -> None:
    """Nearest training images of test queries (a grid) and retrieval precision@1/5/10."""
    from medlatent.eval.session import RunEvaluation

    result = RunEvaluation(run, None, data_dir).retrieval(k=k, n_queries=queries)
    click.echo("  ".join(f"{name} {v:.4f}" for name, v in result.items() if name.startswith("precision@")))
    click.echo(f"written: {result['figure']}")


@cli.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--data-dir", default=None)
@click.option("--device", default="auto", show_default=True)
def report(run: str, data_dir: str | None, device: str) -> None:
    """One self-contained HTML page: config, training curves, probes, label efficiency (if run),
    embedding map, retrieval, confusion matrix, published rows."""
    from medlatent.api import report as write

    click.echo(f"written: {write(run, data_dir, device)}")


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--html", "html_out", default=None, help="Also write the table as an HTML page.")
def compare(runs: tuple[str, ...], html_out: str | None) -> None:
    """Side-by-side table of several runs (their probe results on test)."""
    from medlatent.api import compare as table

    md, written = table(list(runs), html_out)
    click.echo(md)
    if written:
        click.echo(f"written: {written}")


@cli.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--images", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="Image files to show (repeatable); default: the first --n images of --split.")
@click.option("--n", type=COUNT, default=8, show_default=True)
@click.option("--split", default="test", show_default=True)
@click.option("--out", default=None, help="PNG to write (default: <run>/attention.png).")
@click.option("--data-dir", default=None)
def attention(run: str, images: tuple[str, ...], n: int, split: str, out: str | None, data_dir: str | None) -> None:
    """Last-layer CLS attention of a ViT encoder per head, over the images (DINO's maps)."""
    from medlatent.api import attention as draw

    click.echo(f"written: {draw(run, list(images) or None, n, split, out, data_dir)}")


@cli.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--n", type=COUNT, default=8, show_default=True)
@click.option("--split", default="test", show_default=True)
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True, help="Seed of the random masks.")
@click.option("--out", default=None, help="PNG to write (default: <run>/reconstruction.png).")
@click.option("--data-dir", default=None)
def reconstruct(run: str, n: int, split: str, seed: int, out: str | None, data_dir: str | None) -> None:
    """MAE input / masked / reconstruction grid for a few images."""
    from medlatent.api import reconstruct as draw

    click.echo(f"written: {draw(run, n, split, out, seed, data_dir)}")


# ------------------------------------------------------------------------------ adaptation


@cli.command("adapt")
@click.argument("source", type=click.Path())
@click.option("--data", "data_name", default=None,
              help="Labelled data (default: the run's pretraining data; required for a weights file).")
@click.option("--strategy", default="lora", show_default=True,
              help="linear, finetune, bias, lora, adapter, adaptformer or prompt.")
@click.option("--rank", type=COUNT, default=None, help="LoRA rank / adapter bottleneck width (default 8).")
@click.option("--alpha", type=POSITIVE, default=None, help="LoRA alpha (update scale alpha/rank; default 16).")
@click.option("--lora-targets", type=click.Choice(["qv", "all"]), default=None,
              help="LoRA on W_q and W_v (qv, default) or on every Linear of every block (all).")
@click.option("--prompts", type=int, default=None, help="Prompt tokens per layer (default 10).")
@click.option("--shallow", is_flag=True, help="VPT-shallow: prompts at the input only.")
@click.option("--fraction", type=FRACTION, default=1.0, show_default=True, help="Fraction of training labels.")
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True)
@click.option("--epochs", type=COUNT, default=None, help="Most epochs (default 30; early stopping on val).")
@click.option("--min-steps", type=NON_NEGATIVE_INT, default=None, help="Fewest optimiser steps (default 300).")
@click.option("--heads", type=COUNT, default=None, help="Attention heads of external weights (default: by width).")
@click.option("--out", default=None, help="Adapter path without suffix (default: <run>/adapters/<strategy>-<data>).")
@click.option("--data-dir", default=None)
@click.option("--device", default="auto", show_default=True)
def adapt_cmd(source: str, data_name: str | None, strategy: str, rank: int | None, alpha: float | None,
              lora_targets: str | None, prompts: int | None, shallow: bool, fraction: float, seed: int, epochs: int | None,
              min_steps: int | None, heads: int | None, out: str | None, data_dir: str | None, device: str) -> None:
    """Adapt a pretrained encoder (a run folder, or ViT weights in timm/DINO/MAE layout) to a
    labelled task, training few parameters; writes the adapter (.safetensors + .json)."""
    from medlatent.adapt.run import WEIGHT_SUFFIXES, adapt_and_evaluate, load_base
    from medlatent.adapt.strategies import AdaptConfig, adapt
    from medlatent.eval.finetune import FinetuneConfig

    given = dict(rank=rank, alpha=alpha, lora_targets=lora_targets, prompts=prompts)
    cfg = AdaptConfig(strategy=strategy, deep=not shallow, **{k: v for k, v in given.items() if v is not None})
    ft = FinetuneConfig(feature_norm=True,
                        **{k: v for k, v in dict(epochs=epochs, min_steps=min_steps).items() if v is not None})
    base = load_base(source, data_name, data_dir, heads, device)
    adapt(base.encoder, cfg)  # fails fast on a strategy the encoder cannot take
    if base.notes:
        click.echo(f"weights: {base.notes}")
    if out is None:
        root = Path(source).with_suffix("") if Path(source).suffix in WEIGHT_SUFFIXES else Path(source)
        out = str(root / "adapters" / f"{strategy}-{base.data.name}-{fraction:g}")
    r = adapt_and_evaluate(base, cfg, fraction, seed, ft, out, device)
    click.echo(f"{strategy}: {r['trainable_params']:,} trainable parameters ({r['trainable_pct']:.2f} % of the "
               f"encoder) + head {r['head_params']:,}; {r['n_labels']} labels, {r['steps']} steps, "
               f"{r['train_s']:.0f} s, peak RSS {r['peak_rss_gib']:.2f} GiB")
    click.echo(f"test ACC {r['test']['acc']:.4f}  AUC {r['test']['auc']:.4f}  (val ACC {r['val']['acc']:.4f})")
    click.echo(f"written: {r['adapter']} ({r['adapter_bytes'] / 1024:.0f} KiB) and its .json")


@cli.command()
@click.argument("source", type=click.Path())
@click.option("--data", "data_name", default=None, help="Labelled data (default: the run's pretraining data).")
@click.option("--positive-class", type=NON_NEGATIVE_INT, default=0, show_default=True,
              help="A bag is positive when it holds an image of this class.")
@click.option("--bag-size", type=COUNT, default=16, show_default=True)
@click.option("--bags", type=COUNT, default=400, show_default=True, help="Training bags (val/test: half as many).")
@click.option("--prompts", type=int, default=0, show_default=True,
              help="Prompt-MIL: train this many prompt tokens in the frozen ViT too (0: attention MIL on frozen embeddings).")
@click.option("--steps", type=COUNT, default=300, show_default=True)
@click.option("--out", default=None, help="Figure of test bags with attention (default: <run>/mil.png).")
@click.option("--data-dir", default=None)
@click.option("--device", default="auto", show_default=True)
def mil(source: str, data_name: str | None, positive_class: int, bag_size: int, bags: int, prompts: int, steps: int,
        out: str | None, data_dir: str | None, device: str) -> None:
    """Multiple-instance learning on bags built from labelled images: attention MIL (Ilse et al.)
    or Prompt-MIL; bag AUC and the share of attention on the positive images."""
    from medlatent.adapt.run import load_base
    from medlatent.adapt.run import run_mil

    base = load_base(source, data_name, data_dir, None, device)
    default = (Path(source).with_suffix("") if Path(source).is_file() else Path(source)) / "mil.png"
    r = run_mil(base, positive_class, bag_size, bags, prompts, steps, Path(out) if out else default)
    click.echo(f"{r['method']}: bag AUC {r['auc']:.4f}  ACC {r['acc']:.4f}; attention on positive images "
               f"{r['attention_on_positives']:.3f} (uniform attention: {r['uniform_share']:.3f})")
    click.echo(f"written: {r['figure']}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _warnings_to_stderr() -> None:
    """Library warnings (e.g. a damaged checkpoint skipped) as ``warning: ...`` lines on stderr."""
    import logging

    class Echo(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            click.echo(f"warning: {record.getMessage()}", err=True)  # the current stderr

    log = logging.getLogger("medlatent")
    if not any(isinstance(h, Echo) or getattr(h, "medlatent_cli", False) for h in log.handlers):
        handler = Echo()
        handler.medlatent_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.WARNING)
    log.propagate = False


def main() -> None:
    """Entry point: run the CLI, turning user-fixable problems into one line and exit code 1."""
    _warnings_to_stderr()
    try:
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
