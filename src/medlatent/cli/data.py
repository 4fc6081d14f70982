"""``medlatent data``: the MedMNIST catalogue, downloads, and preparing a store from your own images."""

from __future__ import annotations

import click

from medlatent.cli.common import DATA_DIR_HELP


@click.group()
def data() -> None:
    """MedMNIST catalogue and downloads; your own images into a store."""


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


def _floats(text: str | None, n: int, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise click.BadParameter(f"expected {n} comma-separated numbers, got '{text}'", param_hint=flag)
    return values


@data.command("prepare")
@click.argument("source", type=click.Path())
@click.option("--output", "-o", required=True, help="Store folder to write (reused when the inputs match).")
@click.option("--labels", type=click.Path(), help="For a flat folder: CSV of path,label[,split][,group].")
@click.option("--size", type=click.IntRange(min=8), help="Image side in pixels. [default: the first image's]")
@click.option("--split", "split", help="train,val,test fractions for images without a given split. [default: 0.8,0.1,0.1]")
@click.option("--group-by", help="CSV column of patient/study ids, or 'parent' (each image's folder); a group never spans splits.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Decode processes.")
@click.option("--skip-bad", is_flag=True, help="Leave unreadable files out (listed and counted) instead of refusing.")
@click.option("--overwrite", is_flag=True, help="Replace a store made from other inputs.")
@click.option("--path-column", default="path", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--split-column", default="split", show_default=True)
@click.option("--classes", help="Class names in label order, comma-separated. [default: the sorted labels]")
@click.option("--channels", type=click.IntRange(1, 3), help="Convert every image to 1 or 3 channels.")
@click.option("--spatial-dims", type=click.IntRange(2, 3), default=2, show_default=True, help="3 for volumes.")
@click.option("--slices", is_flag=True, help="A 2-D store of every slice of each NIfTI volume (last axis).")
@click.option("--normalize", type=click.Choice(["auto", "percentile", "window", "none"]), default="auto",
              show_default=True, help="auto: 8-bit kept, DICOM by its header window, others by percentiles.")
@click.option("--window", help="CENTRE,WIDTH for --normalize window (CT soft tissue: 40,400).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the drawn splits.")
def data_prepare(source: str, output: str, labels: str | None, size: int | None, split: str | None,
                 group_by: str | None, workers: int, skip_bad: bool, overwrite: bool, path_column: str,
                 label_column: str, split_column: str, classes: str | None, channels: int | None,
                 spatial_dims: int, slices: bool, normalize: str, window: str | None, seed: int) -> None:
    """Decode a folder or CSV of images once into a memory-mapped store for training and probes."""
    from medlatent.api import prepare_store

    options: dict = dict(size=size, spatial_dims=spatial_dims, channels=channels, normalize=normalize,
                         seed=seed, workers=workers, skip_bad=skip_bad, slices=slices)
    if split is not None:
        options["split"] = _floats(split, 3, "--split")
    if window is not None:
        options["window"] = _floats(window, 2, "--window")
    columns = dict(path=path_column, label=label_column, split=split_column)
    store = prepare_store(source, output, labels, columns, group_by,
                          classes.split(",") if classes else None, overwrite, **options)
    counts = ", ".join(f"{k} {v:,}" for k, v in store.splits.items())
    verb = "reused" if store.reused else f"written in {store.seconds:.0f} s"
    click.echo(f"{store.path}: {store.count:,} images at {store.size} px, {store.channels} channel(s) ({counts}); {verb}")
    if store.skipped:
        click.echo(f"skipped {len(store.skipped)} unreadable file(s), listed in {store.path}.unreadable.csv")
    click.echo(f"next: medlatent pretrain --data {store.path}")
