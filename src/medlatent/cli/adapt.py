"""``medlatent adapt`` and ``medlatent mil``: few-parameter adaptation of pretrained encoders,
and multiple-instance learning over bags of images."""

from __future__ import annotations

from pathlib import Path

import click

from medlatent.cli.common import COUNT, DATA_DIR_HELP, FRACTION, NON_NEGATIVE_INT, POSITIVE, echo_written, renamed


@click.command("adapt")
@click.argument("source", type=click.Path())
@click.option("--data", "data_name", default=None,
              help="Labelled data (default: the run's pretraining data; required for a weights file).")
@click.option("--strategy", default="lora", show_default=True,
              help="linear, finetune, bias, lora, adapter, adaptformer or prompt.")
@click.option("--rank", type=COUNT, default=None, help="LoRA rank / adapter bottleneck width (default 8).")
@click.option("--alpha", type=POSITIVE, default=None, help="LoRA alpha (update scale alpha/rank; default 16).")
@click.option("--lora-targets", type=click.Choice(["qv", "all"]), default=None,
              help="LoRA on W_q and W_v (qv, default) or on every Linear of every block (all).")
@click.option("--prompts", type=COUNT, default=None, help="Prompt tokens per layer (default 10).")
@click.option("--shallow", is_flag=True, help="VPT-shallow: prompts at the input only.")
@click.option("--label-fraction", "fraction", type=FRACTION, default=1.0, show_default=True,
              help="Fraction of training labels.")
@click.option("--fraction", "old_fraction", type=FRACTION, default=None, hidden=True)
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True)
@click.option("--epochs", type=COUNT, default=None, help="Most epochs (default 30; early stopping on val).")
@click.option("--min-steps", type=NON_NEGATIVE_INT, default=None, help="Fewest optimiser steps (default 300).")
@click.option("--heads", type=COUNT, default=None, help="Attention heads of external weights (default: by width).")
@click.option("--out", default=None, help="Adapter path without suffix (default: <run>/adapters/<strategy>-<data>).")
@click.option("--data-dir", default=None, help=DATA_DIR_HELP)
@click.option("--device", default="auto", show_default=True)
@click.option("--log", "log", multiple=True, metavar="TRACKER",
              help="Also log the adapter's training to tensorboard / mlflow (repeatable), in <adapter>.trackers/ "
                   "beside the adapter files (pip install 'medlatent[track]').")
def adapt_cmd(source: str, data_name: str | None, strategy: str, rank: int | None, alpha: float | None,
              lora_targets: str | None, prompts: int | None, shallow: bool, fraction: float,
              old_fraction: float | None, seed: int, epochs: int | None, min_steps: int | None, heads: int | None,
              out: str | None, data_dir: str | None, device: str, log: tuple[str, ...]) -> None:
    """Adapt a pretrained encoder (a run folder, or ViT weights in timm/DINO/MAE layout) to a
    labelled task, training few parameters; writes the adapter (.safetensors + .json)."""
    from medlatent.api import AdaptConfig, FinetuneConfig, adapt

    fraction = renamed(fraction, old_fraction, "--fraction", "--label-fraction")
    given = dict(rank=rank, alpha=alpha, lora_targets=lora_targets, prompts=prompts)
    cfg = AdaptConfig(strategy=strategy, deep=not shallow, **{k: v for k, v in given.items() if v is not None})
    ft = FinetuneConfig(feature_norm=True,
                        **{k: v for k, v in dict(epochs=epochs, min_steps=min_steps).items() if v is not None})
    r = adapt(source, cfg, data_name, fraction, seed, ft, heads, out, data_dir, device, log=log)
    if r["weights_notes"]:
        click.echo(f"weights: {r['weights_notes']}")
    click.echo(f"{strategy}: {r['trainable_params']:,} trainable parameters ({r['trainable_pct']:.2f} % of the "
               f"encoder) + head {r['head_params']:,}; {r['n_labels']} labels, {r['steps']} steps, "
               f"{r['train_s']:.0f} s, peak RSS {r['peak_rss_gib']:.2f} GiB")
    click.echo(f"test ACC {r['test']['acc']:.4f}  AUC {r['test']['auc']:.4f}  (val ACC {r['val']['acc']:.4f})")
    click.echo(f"written: {r['adapter']} ({r['adapter_bytes'] / 1024:.0f} KiB) and its .json")
    if r.get("trackers"):
        click.echo(f"trackers: {r['trackers']}")


@click.command()
@click.argument("source", type=click.Path())
@click.option("--data", "data_name", default=None, help="Labelled data (default: the run's pretraining data).")
@click.option("--positive-class", type=NON_NEGATIVE_INT, default=0, show_default=True,
              help="A bag is positive when it holds an image of this class.")
@click.option("--bag-size", type=COUNT, default=16, show_default=True)
@click.option("--bags", type=COUNT, default=400, show_default=True, help="Training bags (val/test: half as many).")
@click.option("--prompts", type=NON_NEGATIVE_INT, default=0, show_default=True,
              help="Prompt-MIL: train this many prompt tokens in the frozen ViT too (0: attention MIL on frozen embeddings).")
@click.option("--steps", type=COUNT, default=300, show_default=True)
@click.option("--out", default=None, help="Figure of test bags with attention (default: <run>/mil.png).")
@click.option("--data-dir", default=None, help=DATA_DIR_HELP)
@click.option("--device", default="auto", show_default=True)
def mil(source: str, data_name: str | None, positive_class: int, bag_size: int, bags: int, prompts: int, steps: int,
        out: str | None, data_dir: str | None, device: str) -> None:
    """Multiple-instance learning on bags built from labelled images: attention MIL (Ilse et al.)
    or Prompt-MIL; bag AUC and the share of attention on the positive images."""
    from medlatent.api import mil as run_mil

    r = run_mil(source, data_name, positive_class, bag_size, bags, prompts, steps, Path(out) if out else None,
                data_dir, device)
    click.echo(f"{r['method']}: bag AUC {r['auc']:.4f}  ACC {r['acc']:.4f}; attention on positive images "
               f"{r['attention_on_positives']:.3f} (uniform attention: {r['uniform_share']:.3f})")
    echo_written(r["figure"])


COMMANDS = [adapt_cmd, mil]
