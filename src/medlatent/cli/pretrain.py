"""``medlatent pretrain``: learn an encoder from unlabelled images."""

from __future__ import annotations

from typing import Any

import click

from medlatent.cli.common import train, training_command


@click.command()
@click.option("--method", default=None, help="simclr, mocov2, mocov3, byol, dino, mae, ijepa, rotation, "
              "autoencoder, denoising-autoencoder. [default: simclr]")
@click.option("--backbone", default=None,
              help="resnet18, resnet18-half, resnet18-quarter, resnet50, vit-tiny, vit-small, vit-base. "
                   "[default: resnet18-quarter]")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd", "lars"]), default=None)
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the encoder.")
@click.option("--init", default=None, help="Start from these weights: a run folder, or a timm/DINO/MAE/MONAI "
              "state dict (.safetensors, .pt, .pth).")
@training_command
def pretrain(method: str | None, backbone: str | None, optimizer: str | None, compile_: bool | None,
             init: str | None, **kwargs: Any) -> None:
    """Learn an encoder from unlabelled images (labels are never read)."""
    own = {"method": method, "backbone.name": backbone, "optim.name": optimizer, "train.compile": compile_,
           "backbone.init": init}
    train(kwargs, own, {"--method": method, "--backbone": backbone, "--optimizer": optimizer,
                        "--compile/--no-compile": compile_, "--init": init})
