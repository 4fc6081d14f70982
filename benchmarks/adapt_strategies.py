"""Every adaptation strategy on BloodMNIST and PneumoniaMNIST at 10 % and 100 % of the labels,
from one self-supervised ViT recipe (a run per data set), each in its own process (so peak
memory is its own); then a table like AdaptFormer's (trainable parameters, ACC/AUC, time).

    python benchmarks/adapt_strategies.py --run bloodmnist=RUN --run pneumoniamnist=RUN --epochs 5
    python benchmarks/adapt_strategies.py --table-only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import memory_cell  # benchmarks/common.py

STRATEGIES = ["linear", "finetune", "bias", "lora", "lora-all", "adapter", "adaptformer", "prompt"]
# Named variants beyond a strategy's defaults. lora-all: LoRA on every Linear of every block at
# rank 2 (alpha = 2r, so alpha / r = 2 as for the default), the same 73,728 parameters on ViT-tiny
# as the default rank-8 LoRA on q and v.
VARIANTS = {"lora-all": dict(strategy="lora", lora_targets="all", rank=2, alpha=4.0)}
DEFAULT = [s for s in STRATEGIES if s not in VARIANTS]


def one(args: argparse.Namespace, base: object = None) -> None:
    """One strategy and fraction; ``base`` (a loaded run) saves reloading it in --in-process mode."""
    import torch

    from medlatent.adapt.run import adapt_and_evaluate, load_base
    from medlatent.adapt.strategies import AdaptConfig
    from medlatent.eval.finetune import FinetuneConfig

    base = base or load_base(args.one_run, device=args.device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    ft = FinetuneConfig(epochs=args.epochs, min_steps=args.min_steps, feature_norm=True)
    cfg = AdaptConfig(**VARIANTS.get(args.one_strategy, dict(strategy=args.one_strategy)))
    r = adapt_and_evaluate(base, cfg, args.one_fraction, 0, ft, device=args.device)
    r["strategy"] = args.one_strategy
    Path(args.one_out).write_text(json.dumps(r, indent=2))


def table(out: Path) -> str:
    rows = [r for f in sorted(out.glob("*.json")) if "strategy" in (r := json.loads(f.read_text()))]
    lines = ["| strategy | trainable params | % of encoder | data | labels | test ACC | test AUC | train time | peak memory |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = {s: i for i, s in enumerate(STRATEGIES)}
    for r in sorted(rows, key=lambda r: (r["data"], -r["fraction"], order[r["strategy"]])):
        lines.append(f"| {r['strategy']} | {r['trainable_params']:,} | {r['trainable_pct']:.2f} % | {r['data']} | "
                     f"{r['fraction']:.0%} | {r['test']['acc']:.3f} | {r['test']['auc']:.3f} | {r['train_s']:.0f} s | "
                     f"{memory_cell(r)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", default=[], help="DATA=RUN_DIR (repeatable)")
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.1, 1.0])
    ap.add_argument("--strategies", nargs="+", default=DEFAULT, choices=STRATEGIES)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--min-steps", type=int, default=200)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--in-process", action="store_true",
                    help="run every cell in this process (peak RSS then is the largest so far; GPU peak is per cell)")
    ap.add_argument("--out-dir", default="benchmarks/out/adapt")
    ap.add_argument("--table-only", action="store_true")
    for name in ("run", "strategy", "fraction", "out"):  # internal: one combination in this process
        ap.add_argument(f"--one-{name}", type=float if name == "fraction" else str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_run:
        return one(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = None
    if not args.table_only:
        for spec in args.run:
            data, run = spec.split("=", 1)
            for fraction in args.fractions:
                for strategy in args.strategies:
                    f = out / f"{data}_{fraction:g}_{strategy}.json"
                    if f.exists():
                        continue  # resumable
                    if args.in_process:  # one process for every cell (GPU: no start-up per cell)
                        from medlatent.adapt.run import load_base

                        loaded = loaded if loaded and loaded[0] == run else (run, load_base(run, device=args.device))
                        one(argparse.Namespace(**{**vars(args), "one_run": run, "one_strategy": strategy,
                                                  "one_fraction": fraction, "one_out": str(f)}), loaded[1])
                        print(f"{data} {fraction:g} {strategy}: ok", flush=True)
                        continue
                    cmd = [sys.executable, __file__, "--one-run", run, "--one-strategy", strategy, "--one-fraction",
                           str(fraction), "--one-out", str(f), "--epochs", str(args.epochs),
                           "--min-steps", str(args.min_steps), "--device", args.device]
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    print(f"{data} {fraction:g} {strategy}: " + ("ok" if res.returncode == 0 else res.stderr[-1500:]),
                          flush=True)
    print(f"fine-tuning protocol: AdamW (lr 1e-3; full fine-tuning: encoder 1e-4), feature BatchNorm before the "
          f"head, at most {args.epochs} epochs and at least {args.min_steps} steps, early stopping on val; test ACC/AUC")
    print(table(out))


if __name__ == "__main__":
    main()
