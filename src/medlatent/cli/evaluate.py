"""Evaluation commands: probes, label efficiency, embeddings, maps, retrieval, figures, reports."""

from __future__ import annotations

from pathlib import Path

import click

from medlatent.cli.common import COUNT, DATA_DIR_HELP, FRACTION, NON_NEGATIVE_INT, echo_written, renamed

RUN = click.Path(file_okay=False)


@click.command()
@click.argument("run", type=RUN)
@click.option("--data", "data_name", default=None, help="Labelled data to probe on (default: the pretraining data).")
@click.option("--split", "splits", multiple=True, default=("val", "test"), show_default=True)
@click.option("--label-fraction", "fractions", multiple=True, type=FRACTION, default=(1.0,), show_default=True,
              help="Fraction of training labels (repeatable: 0.01 0.1 1).")
@click.option("--seeds", type=COUNT, default=1, show_default=True, help="Label-subset draws per fraction < 1.")
@click.option("--k", type=COUNT, default=20, show_default=True, help="Neighbours for k-NN.")
@click.option("--data-dir", default=None, help=DATA_DIR_HELP)
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
    echo_written(result["file"])


@click.command()
@click.argument("run", type=RUN)
@click.option("--split", default="test", show_default=True)
@click.option("--out", default=None, help="Output .npz (default: <run>/embeddings-<split>.npz).")
@click.option("--data", "data_name", default=None, help="Images to embed (default: the pretraining data).")
@click.option("--data-dir", default=None, help=DATA_DIR_HELP)
@click.option("--device", default="auto", show_default=True)
def embed(run: str, split: str, out: str | None, data_name: str | None, data_dir: str | None, device: str) -> None:
    """Write a split's embeddings with their ids (index in the split, source file) and labels to
    an .npz and a CSV beside it, for your own analysis."""
    from medlatent.api import embed as run_embed

    path = run_embed(run, split, out, data_name, data_dir, device)
    echo_written(path, *[p for p in (Path(path).with_suffix(".csv"), Path(path).with_suffix(".parquet")) if p.is_file()])


@click.command()
@click.argument("run", type=RUN)
@click.option("--label-fraction", "fractions", multiple=True, type=FRACTION, default=(0.01, 0.1, 0.25, 1.0),
              show_default=True, help="Fractions of the training labels (repeatable).")
@click.option("--fraction", "old_fractions", multiple=True, type=FRACTION, hidden=True)
@click.option("--seeds", type=COUNT, default=3, show_default=True,
              help="Label-subset draws per fraction (one at 100 %%: the same labels).")
@click.option("--protocol", "protocols", multiple=True, default=("knn", "linear", "finetune", "supervised"),
              show_default=True,
              help="knn, linear (frozen encoder), finetune (the pretrained encoder), lpft (linear probe, then "
                   "fine-tuning from it), supervised (from scratch), semi / semi-scratch (FixMatch with the rest of "
                   "the train split unlabelled, from the pretrained encoder / from scratch).")
@click.option("--epochs", type=COUNT, default=None, help="Most fine-tuning epochs (default 30; early stopping on val).")
@click.option("--min-steps", type=NON_NEGATIVE_INT, default=None,
              help="Fewest fine-tuning steps, so small label fractions still train (default 300).")
@click.option("--lr", "lrs", multiple=True, type=float,
              help="Head learning rates tried on val (repeatable; default 1e-3, 3e-4, 1e-4).")
@click.option("--encoder-lr-scale", "scales", multiple=True, type=float,
              help="Encoder learning rate as a fraction of the head's, tried on val (repeatable; default 1.0, "
                   "0.1). One --lr and one --encoder-lr-scale: no search.")
@click.option("--no-lr-search", is_flag=True,
              help="Train once: head lr 1e-3, encoder 0.1x (1x from scratch), the protocol before the search.")
@click.option("--search-fraction", type=float, default=None,
              help="Each candidate's share of the training budget (default 0.25; 1: no retraining).")
@click.option("--tau", type=float, default=None, help="FixMatch confidence threshold (default 0.95).")
@click.option("--mu", type=int, default=None, help="FixMatch unlabelled images per labelled one (default 2).")
@click.option("--lambda-u", type=float, default=None, help="FixMatch weight of the unlabelled loss (default 1).")
@click.option("--data", "data_name", default=None, help="Labelled data (default: the pretraining data).")
@click.option("--data-dir", default=None, help=DATA_DIR_HELP)
@click.option("--device", default="auto", show_default=True)
@click.option("--log", "log", multiple=True, metavar="TRACKER",
              help="Also log the fine-tuning and supervised trainings to tensorboard / mlflow (repeatable), in "
                   "<run>/tensorboard and <run>/mlruns under <protocol>/<fraction>/seed<n>/ "
                   "(pip install 'medlatent[track]').")
def efficiency(run: str, fractions: tuple[float, ...], old_fractions: tuple[float, ...], seeds: int,
               protocols: tuple[str, ...], epochs: int | None, min_steps: int | None, lrs: tuple[float, ...],
               scales: tuple[float, ...], no_lr_search: bool, search_fraction: float | None, tau: float | None,
               mu: int | None,
               lambda_u: float | None, data_name: str | None, data_dir: str | None, device: str,
               log: tuple[str, ...]) -> None:
    """Label-efficiency curves: k-NN, linear probe, fine-tuning, LP-FT, FixMatch and the
    supervised baseline at several label fractions and seeds (mean and std), with a plot; the
    learning rate of every trained protocol chosen on val."""
    from medlatent.api import FinetuneConfig, SemiConfig, crossover_words, label_efficiency

    def given(**kw: object) -> dict:
        return {k: v for k, v in kw.items() if v is not None}

    fractions = renamed(fractions, old_fractions, "--fraction", "--label-fraction")
    if no_lr_search and (lrs or scales):
        raise click.UsageError("--no-lr-search trains one candidate; it takes no --lr or --encoder-lr-scale")
    grid = dict(lr_grid=None, encoder_lr_scale_grid=None) if no_lr_search else given(
        lr_grid=tuple(lrs) or None, encoder_lr_scale_grid=tuple(scales) or None)
    cfg = FinetuneConfig(**given(epochs=epochs, min_steps=min_steps, search_fraction=search_fraction), **grid)
    semi = SemiConfig(**given(tau=tau, mu=mu, lambda_u=lambda_u))

    def progress(fraction: float, seed: int) -> None:
        click.echo(f"  {fraction:.0%} of the labels, seed {seed}: done")

    result = label_efficiency(run, fractions, tuple(range(seeds)), protocols, cfg, data_name, data_dir, device, progress,
                              log=log, semi=semi)
    click.echo(f"{'protocol':12} {'labels':>7}  {'test ACC':>15}  {'test AUC':>15}")
    for r in sorted(result["summary"], key=lambda r: (r["protocol"], r["fraction"])):
        click.echo(f"{r['protocol']:12} {r['fraction']:>7.0%}  {r['acc']:.4f} ± {r['acc_std']:.4f}  "
                   f"{r['auc']:.4f} ± {r['auc_std']:.4f}")
    for protocol, c in result["crossover"].items():
        if c is not None:
            click.echo(f"{protocol} vs training from scratch: {crossover_words(c)}")
    echo_written(result["file"], Path(result["file"]).with_suffix(".png"))


@click.command("map")
@click.argument("run", type=RUN)
@click.option("--split", default="test", show_default=True)
@click.option("--max-points", type=click.IntRange(min=2), default=2000, show_default=True)
@click.option("--out", default=None, help="PNG to write (default: <run>/embedding_map_<split>.png).")
@click.option("--data-dir", default=None, help=DATA_DIR_HELP)
def map_(run: str, split: str, max_points: int, out: str | None, data_dir: str | None) -> None:
    """2-D map of the embedding (UMAP if installed, else t-SNE), coloured by label, with thumbnails;
    the coordinates (index in the split, x, y, label) in a CSV beside the PNG."""
    from medlatent.api import embedding_map

    path = embedding_map(run, split, max_points, out, data_dir)
    echo_written(path, Path(path).with_suffix(".csv"))


@click.command()
@click.argument("run", type=RUN)
@click.option("--k", type=COUNT, default=8, show_default=True, help="Neighbours shown per query.")
@click.option("--queries", type=COUNT, default=6, show_default=True)
@click.option("--data-dir", default=None, help=DATA_DIR_HELP)
def retrieve(run: str, k: int, queries: int, data_dir: str | None) -> None:
    """Nearest training images of test queries (a grid) and retrieval precision@1/5/10."""
    from medlatent.api import retrieval

    result = retrieval(run, k, queries, data_dir)
    click.echo("  ".join(f"{name} {v:.4f}" for name, v in result.items() if name.startswith("precision@")))
    echo_written(result["figure"])


@click.command()
@click.argument("run", type=RUN)
@click.option("--data-dir", default=None, help=DATA_DIR_HELP)
@click.option("--device", default="auto", show_default=True)
def report(run: str, data_dir: str | None, device: str) -> None:
    """One self-contained HTML page: config, training curves, probes, label efficiency (if run),
    embedding map, retrieval, confusion matrix, published rows."""
    from medlatent.api import report as write

    echo_written(write(run, data_dir, device))


@click.command()
@click.argument("runs", nargs=-1, required=True, type=RUN)
@click.option("--html", "html_out", default=None, help="Also write the table as an HTML page.")
def compare(runs: tuple[str, ...], html_out: str | None) -> None:
    """Side-by-side table of several runs (their probe results on test)."""
    from medlatent.api import compare as table

    md, written = table(list(runs), html_out)
    click.echo(md)
    if written:
        echo_written(written)


@click.command()
@click.argument("run", type=RUN)
@click.option("--images", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="Image files to show (repeatable); default: the first --n images of --split.")
@click.option("--n", type=COUNT, default=8, show_default=True)
@click.option("--split", default="test", show_default=True)
@click.option("--out", default=None, help="PNG to write (default: <run>/attention.png).")
@click.option("--data-dir", default=None, help=DATA_DIR_HELP)
def attention(run: str, images: tuple[str, ...], n: int, split: str, out: str | None, data_dir: str | None) -> None:
    """Last-layer CLS attention of a ViT encoder per head, over the images (DINO's maps)."""
    from medlatent.api import attention as draw

    echo_written(draw(run, list(images) or None, n, split, out, data_dir))


@click.command()
@click.argument("run", type=RUN)
@click.option("--n", type=COUNT, default=8, show_default=True)
@click.option("--split", default="test", show_default=True)
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True, help="Seed of the random masks.")
@click.option("--out", default=None, help="PNG to write (default: <run>/reconstruction.png).")
@click.option("--data-dir", default=None, help=DATA_DIR_HELP)
def reconstruct(run: str, n: int, split: str, seed: int, out: str | None, data_dir: str | None) -> None:
    """MAE input / masked / reconstruction grid for a few images."""
    from medlatent.api import reconstruct as draw

    echo_written(draw(run, n, split, out, seed, data_dir))


COMMANDS = [probe, embed, efficiency, map_, retrieve, report, compare, attention, reconstruct]
