"""``medlatent restore``: restoration of degraded images, and compression."""

from __future__ import annotations

from typing import Any

import click

from medlatent.cli.common import COUNT, DATA_DIR_HELP, echo_written, renamed, train, training_command

TASKS = ("denoise", "poisson", "kspace", "inpaint")
METHODS = {"unet": "restore", "diffusion": "restore-diffusion"}  # --method -> the registered method


@click.group()
def restore() -> None:
    """Restoration: denoising, low-dose (Poisson), undersampled k-space, inpainting."""


@restore.command("train")
@click.option("--task", type=click.Choice(TASKS), default=None, help="The degradation to undo. [default: denoise]")
@click.option("--method", type=click.Choice(list(METHODS)), default=None,
              help="unet: supervised residual UNet; diffusion: conditional (paired) diffusion, Palette-style. "
                   "[default: unet]")
@click.option("--model", "old_method", type=click.Choice(list(METHODS)), default=None, hidden=True)
@training_command
def restore_train(task: str | None, method: str | None, old_method: str | None, **kwargs: Any) -> None:
    """Train a UNet (or a conditional diffusion model) to undo a simulated degradation of clean
    images, drawn fresh at every step."""
    method = renamed(method, old_method, "--model", "--method")
    name = METHODS[method or "unet"]
    task_key = "method_options.task" if name == "restore" else "method_options.restore.task"
    train(kwargs, {"method": name, task_key: task or "denoise"}, {"--method": method, "--task": task})


@restore.command("evaluate")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--diffusion", "diffusion_run", default=None, type=click.Path(file_okay=False),
              help="A ddpm run trained on clean images of the same data: adds diffusion restoration.")
@click.option("--autoencoder", "autoencoder_run", default=None, type=click.Path(file_okay=False),
              help="A (denoising-)autoencoder run on clean images of the same data: adds its row (noise tasks).")
@click.option("--n", type=COUNT, default=500, show_default=True, help="Test images.")
@click.option("--steps", type=COUNT, default=20, show_default=True, help="DDIM steps (x2 for consistency sampling).")
@click.option("--data-dir", default=None, help=DATA_DIR_HELP)
@click.option("--device", default="auto", show_default=True)
def restore_evaluate(run: str, diffusion_run: str | None, autoencoder_run: str | None, n: int, steps: int,
                     data_dir: str | None, device: str) -> None:
    """PSNR and SSIM per degradation level: degraded input, UNet (+ data consistency), classical
    filters (scikit-image) and diffusion."""
    from pathlib import Path

    from medlatent.api import evaluate_restoration

    r = evaluate_restoration(run, diffusion_run, autoencoder_run, n, steps, data_dir, device)
    click.echo(f"{r['data']} test, {r['n_images']} images")
    click.echo(f"{'level':14} {'method':30} {'PSNR':>7} {'SSIM':>6}")
    for row in r["rows"]:
        click.echo(f"{row['level_name']:14} {row['method']:30} {row['psnr']:7.2f} {row['ssim']:6.3f}")
    echo_written(Path(run) / "restore_eval.json", r["figure"])


@restore.command("rate-distortion")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--n", type=COUNT, default=500, show_default=True, help="Test images.")
@click.option("--out", default="rate_distortion.png", show_default=True, help="Plot (a .json is written beside it).")
@click.option("--data-dir", default=None, help=DATA_DIR_HELP)
def restore_rate_distortion(runs: tuple[str, ...], n: int, out: str, data_dir: str | None) -> None:
    """Autoencoder runs (any latent sizes) against JPEG at the same bytes: PSNR/SSIM vs bytes."""
    from medlatent.api import rate_distortion

    r = rate_distortion(list(runs), n, out, data_dir)
    for row in r["rows"]:
        extra = f" (file {row['file_bytes']:.0f} B)" if "file_bytes" in row else ""
        click.echo(f"{row['codec']:28} q{row.get('quality', '-')!s:>3} {row['bytes']:7.1f} B{extra:16}  "
                   f"PSNR {row['psnr']:6.2f}  SSIM {row['ssim']:.3f}")
    echo_written(r["figure"], r["table"])
