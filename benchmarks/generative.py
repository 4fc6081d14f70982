"""VAE, GAN, DDPM and latent diffusion, class-conditional, on one MedMNIST subset at the same
wall-clock training budget on this machine; then `medlatent generate evaluate` for each
(Frechet distance, precision/recall, TSTR vs TRTR, memorisation) and one table.

The epochs are calibrated by benchmarks/calibrate.py: a 25-second run measures img/s and the
cosine schedule is sized to fill the budget.

    python benchmarks/generative.py --data bloodmnist --budget-min 8
    python benchmarks/generative.py --table-only
    python benchmarks/generative.py --models ddpm --set method_options.prediction=epsilon --out-dir DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml
from calibrate import calibrated_epochs, median_images_per_second, run_budgeted, run_cli, train_images
from common import SMALL_BATCH_DIFFUSION, parse_with_results, peak_rss_gib

from medlatent.data.catalogue import split_size

MODELS = {"vae": 1.0, "gan": 1.0, "ddpm": 2.0, "ldm": 2.0}  # model -> guidance used for sampling
OVERRIDES = {"ddpm": SMALL_BATCH_DIFFUSION}  # see benchmarks/common.py


def one(model: str, args: argparse.Namespace, out: Path) -> dict:
    budget_s = args.budget_min * 60
    run = out / f"run-{model}-{args.data}"
    train = ["generate", "train", "--method", model, "--data", args.data, "--conditional", *OVERRIDES.get(model, []),
             *[a for kv in args.set for a in ("--set", kv)]]
    if args.evaluate_only:  # the run is trained already: judge it again
        ips = None
        epochs = float(yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"])
        train_s = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["time_s"]
    else:
        ips, epochs = calibrated_epochs(train, train_images(args.data), budget_s, out / f".calibrate-{model}")
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        run_budgeted(train, epochs, budget_s, run)
        train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    run_cli("generate", "evaluate", str(run), "--n", str(args.n), "--guidance", str(MODELS[model]),
            "--steps", str(args.steps), "--classifier-epochs", str(args.classifier_epochs))
    r = json.loads((run / "generation_eval.json").read_text())
    params = json.loads((run / "env.json").read_text())
    r.update(epochs=epochs, calibrated_images_per_s=ips, train_s=train_s, evaluate_s=time.perf_counter() - t1,
             train_images_per_s=median_images_per_second(run, skip_warmup=False), budget_min=args.budget_min,
             machine=params.get("cpu"), run=str(run))
    (out / f"{model}_{args.data}.json").write_text(json.dumps(r, indent=1))
    return r


def table(out: Path, data: str) -> str:
    lines = ["| model | budget | epochs | train img/s | samples/s | Frechet distance | precision | recall | TSTR ACC | "
             "TRTR ACC (same n) | TSTR / TRTR | samples < 0.5 x test NN distance |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    ref = None
    for model in MODELS:
        f = out / f"{model}_{data}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        ref = r
        lines.append(f"| {model} (guidance {r['guidance']:g}) | {r['budget_min']:g} min | {r['epochs']} | {r['train_images_per_s']:.0f} | "
                     f"{r['samples_per_s']:.1f} | {r['frechet_distance']:.2f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['tstr']['acc']:.3f} | {r['trtr_same_n']['acc']:.3f} | "
                     f"{r['tstr_over_trtr']:.2f} | {r['memorisation']['share_below_half']:.1%} |")
    if ref:
        lines.append(f"\nReal train vs real test in the same features: Frechet distance "
                     f"{ref['frechet_distance_train_vs_test']:.2f}. TRTR on all {split_size(data)} training images: "
                     f"ACC {ref['trtr_full']['acc']:.3f}. Features: {ref['domain_encoder']}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="bloodmnist")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--budget-min", type=float, default=8.0)
    ap.add_argument("--n", type=int, default=1000, help="samples judged per model")
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps for ddpm and ldm")
    ap.add_argument("--classifier-epochs", type=int, default=5,
                    help="epochs of the domain classifier (features) and of the TSTR/TRTR classifiers")
    ap.add_argument("--evaluate-only", action="store_true", help="judge existing runs again, no training")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config for every model, e.g. method_options.prediction=epsilon")
    args, out = parse_with_results(ap, "benchmarks/out/generative")
    if not args.table_only:
        for model in args.models:
            if (out / f"{model}_{args.data}.json").exists():
                continue  # resumable
            r = one(model, args, out)
            print(f"{model}: FD {r['frechet_distance']:.2f}, TSTR/TRTR {r['tstr_over_trtr']:.2f}", flush=True)
    print(f"training budget per model in the table (conditional, {args.data}, 28 px, one run each); "
          f"{args.n} samples judged; DDIM {args.steps} steps; peak RSS of this driver "
          f"{peak_rss_gib():.2f} GiB")
    print(table(out, args.data))


if __name__ == "__main__":
    main()
