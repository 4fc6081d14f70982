"""``medlatent data``: the MedMNIST catalogue and downloads."""

from __future__ import annotations

import click

from medlatent.cli.common import DATA_DIR_HELP


@click.group()
def data() -> None:
    """MedMNIST catalogue and downloads."""


@data.command("list")
@click.option("--data-dir", default=None, help=DATA_DIR_HELP)
def data_list(data_dir: str | None) -> None:
    """Every MedMNIST subset: task, classes, size, licence, and whether it is here (28 px)."""
    from medlatent.api import list_datasets

    found, root = list_datasets(data_dir)
    rows = [("name", "dims", "task", "classes", "ch", "train/val/test", "licence", "local")]
    for r in found:
        rows.append((r["name"], f"{r['spatial_dims']}-D", r["task"], str(r["n_classes"]), str(r["channels"]),
                     "/".join(str(r["splits"][s]) for s in ("train", "val", "test")), r["licence"],
                     "yes" if r["present"] else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    click.echo(f"\ndata folder: {root}   (sizes: 2-D 28/64/128/224 px, 3-D 28/64)")


@data.command("download")
@click.argument("names", nargs=-1, required=True)
@click.option("--size", default=28, show_default=True, help="Image side: 28, 64, 128 or 224.")
@click.option("--data-dir", default=None, help=DATA_DIR_HELP)
def data_download(names: tuple[str, ...], size: int, data_dir: str | None) -> None:
    """Fetch official MedMNIST files (md5-verified; a file already here is verified, not fetched)."""
    from medlatent.api import download

    for name in names:
        path = download([name], size, data_dir)[0]
        click.echo(f"{name}: {path} (md5 ok)")
