"""Multiple-instance learning on bags of MedMNIST images: attention MIL on frozen embeddings and
Prompt-MIL (trainable prompt tokens in the frozen ViT), from one self-supervised ViT per data set.

A bag of 16 images is positive when it holds 1-3 images of the chosen class (half the bags);
negative bags hold none. 400 training bags from the train split, 200 test bags from the test
split. Reports bag AUC / ACC, the attention mass on the positive images of positive bags, what
uniform attention would give, training time and peak memory.

    python benchmarks/mil.py --run bloodmnist=RUN:0 --run pneumoniamnist=RUN:1
    python benchmarks/mil.py --table-only
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import parse_with_results, peak_rss_gib  # benchmarks/common.py

VARIANTS = {"attention": 0, "prompt": 4}  # name -> prompt tokens (0: attention MIL on frozen embeddings)


def one(data: str, run: str, positive: int, prompts: int, steps: int, out: Path, device: str) -> dict:
    from medlatent.adapt.run import load_base, run_mil

    base = load_base(run, data, None, None, device)
    t0 = time.perf_counter()
    r = run_mil(base, positive, bag_size=16, n_bags=400, prompts=prompts, steps=steps,
                figure=out.with_suffix(".png"))
    r.update(run=run, steps=steps, time_s=time.perf_counter() - t0,
             peak_rss_gib=peak_rss_gib())
    out.write_text(json.dumps(r, indent=1))
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", default=[], help="DATA=RUN:POSITIVE_CLASS (repeatable)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (the rows in the README say which)")
    args, out = parse_with_results(ap, "benchmarks/out/mil")
    if not args.table_only:
        for spec in args.run:
            data, rest = spec.split("=", 1)
            run, positive = rest.rsplit(":", 1)
            for name, prompts in VARIANTS.items():
                f = out / f"{data}_{name}.json"
                if not f.exists():  # resumable
                    r = one(data, run, int(positive), prompts, args.steps, f, args.device)
                    print(f"{data} {name}: bag AUC {r['auc']:.3f}", flush=True)
    print("| data (positive class) | method | bag AUC | bag ACC | attention on positives | uniform share | time | peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for f in sorted(out.glob("*.json")):
        r = json.loads(f.read_text())
        print(f"| {r['data']} ({r['positive_class']}) | {r['method']} | {r['auc']:.3f} | {r['acc']:.3f} | "
              f"{r['attention_on_positives']:.3f} | {r['uniform_share']:.3f} | {r['time_s']:.0f} s | "
              f"{r['peak_rss_gib']:.2f} GiB |")


if __name__ == "__main__":
    main()
