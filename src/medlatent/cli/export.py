"""``medlatent export``: a run's encoder for MONAI, timm, TorchScript, ONNX or as a MONAI bundle."""

from __future__ import annotations

import click

from medlatent.cli.common import echo_written


@click.command("export")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--format", "fmt", required=True, metavar="FORMAT",
              help="monai (safetensors + MONAI class kwargs), timm (ViTs), torchscript, onnx, or bundle "
                   "(a MONAI bundle that embeds a folder of images).")
@click.option("--out", default=None, help="Output folder (default: <run>/export/<format>).")
def export(run: str, fmt: str, out: str | None) -> None:
    """Write a run's encoder and its preprocessing for another ecosystem, reload it the way that
    ecosystem does, and report the largest difference from the encoder (export.json)."""
    from medlatent.api import export as run_export

    result = run_export(run, fmt, out)
    check = result["check"]
    diff = "not checked" if check["max_abs_diff"] is None else f"max abs diff {check['max_abs_diff']:.1e}"
    click.echo(f"{fmt}: {result['provenance']['backbone']} encoder at step {result['provenance']['step']}; "
               f"reloaded with {check['how']}: {diff}")
    echo_written(result["path"])


COMMANDS = [export]
