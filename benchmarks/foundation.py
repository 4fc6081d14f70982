"""Foundation-model workflows on MedMNIST (28 px), every training cell at the same CPU budget.

Sections (B = --cpu-min CPU-minutes of pretraining; T = PneumoniaMNIST or BloodMNIST):

  continued  REMEDIS's protocol: SimCLR on T for B, initialised from a SimCLR encoder pretrained
             for B on the other three data sets (``source-T``, ``--data`` of three), against the
             same B from random weights, against the source encoder frozen (no further SSL);
             seeds 0, 1, 2; linear-probe and 10 %-label fine-tuning test ACC on T.
  union      one SimCLR encoder on the union of the four data sets for 4B, against the four
             single-data-set encoders (B each; for T the ``random-T-s0`` cell): linear ACC per set.
  dinov2     DINOv2-style against DINO, ViT-tiny, B/2 each, on T: k-NN and linear ACC, attention maps.
  layerwise  greedy layer-wise against end-to-end autoencoder, ResNet-18/4, on T: test
             reconstruction MSE and linear ACC. End to end B/2; layer-wise at the same epochs
             (it spends less CPU: its greedy phases run part of the network) and at the same
             CPU (the epochs scaled by the CPU ratio of the same-epochs pair).

What "the same CPU budget" means here: every cell runs in its own process on one thread
(OMP_NUM_THREADS=1), so two cells share the two cores side by side; its epochs are set from a
short calibration of the same config measured in process CPU seconds (not wall seconds, which
another cell on the other core would distort), so the cosine schedule is complete when the
budget is spent. Each cell records the CPU seconds its training really took. The layer-wise
autoencoder takes the end-to-end autoencoder's calibration (its greedy phases run only part of
the network, so it gets the same epochs and spends at most the same CPU). Fine-tuning uses one
fixed protocol for every arm (``lr_grid=None``: lr 1e-3, encoder 0.1x, early stopping on val).

    python benchmarks/foundation.py --cpu-min 10 --jobs 2           # every cell not yet done
    python benchmarks/foundation.py --cpu-min 10 --only 'dino*'      # a subset (fnmatch on names)
    python benchmarks/foundation.py --table-only
    python benchmarks/foundation.py --rebuild 'single-*' # the run folders again, from the JSONs' epochs

One JSON per cell under benchmarks/results/foundation/ (a rerun skips the cells already there);
run folders and logs under benchmarks/out/foundation/ (kept: later cells start from them).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path("benchmarks/out/foundation")  # run folders and logs (not committed)
RESULTS = Path("benchmarks/results/foundation")  # one JSON per cell (committed)
FOUR = ("pneumoniamnist", "bloodmnist", "breastmnist", "retinamnist")
TARGETS = ("pneumoniamnist", "bloodmnist")
SEEDS = (0, 1, 2)
CALIBRATE_CPU_S = float(os.environ.get("FOUNDATION_CALIBRATE_S", 25.0))  # CPU seconds of the calibration run after its first 3 steps
MARGIN = 0.95  # the schedule's share of the budget (start-up and checkpoints take the rest)


@dataclass
class Cell:
    """One training run (or, with ``train=False``, an evaluation of another cell's encoder).

    Attributes:
        name: the cell's name, also its result file and run folder.
        section: which comparison it belongs to.
        data: the pretraining data (several: a mixture).
        method, backbone: what is trained.
        budget: CPU budget in units of B.
        seed: ``train.seed``.
        init: the cell whose encoder this one starts from (``pretrain --init``).
        evaluate: the data sets its encoder is probed on.
        finetune: also fine-tune with 10 % of the labels (seed = ``seed``).
        sets: extra ``section.key=value`` overrides.
    """

    name: str
    section: str
    data: tuple[str, ...]
    method: str = "simclr"
    backbone: str = "resnet18-quarter"
    budget: float = 1.0
    seed: int = 0
    init: str | None = None
    evaluate: tuple[str, ...] = ()
    finetune: bool = False
    sets: list[str] = field(default_factory=list)
    train: bool = True
    # Calibrate on another cell's config: the layer-wise autoencoder's first steps train one
    # stage (cheap), so it takes the end-to-end run's epochs and uses at most its CPU.
    calibrate_as: str | None = None
    # Match another pair's CPU: (same-epochs cell, reference cell). This cell takes the
    # reference's epochs times reference CPU / same-epochs CPU, so it spends the reference's CPU
    # (the greedy layer-wise autoencoder at the end-to-end one's CPU rather than its epochs).
    match_cpu: tuple[str, str] | None = None


def cells() -> list[Cell]:
    """Every cell, in the order they are run (a cell's ``init`` comes before it): continued
    pretraining's seed 0 first, then DINOv2 vs DINO and the autoencoders (B/2 each), then the
    other seeds and the union."""
    out: list[Cell] = []

    def continued(seed: int) -> None:
        for t in TARGETS:
            if seed == 0:
                others = tuple(d for d in FOUR if d != t)
                out.append(Cell(f"source-{t}", "continued", others, evaluate=(t,), finetune=True))
            out.append(Cell(f"init-{t}-s{seed}", "continued", (t,), seed=seed, init=f"source-{t}", evaluate=(t,),
                            finetune=True))
            out.append(Cell(f"random-{t}-s{seed}", "continued", (t,), seed=seed, evaluate=(t,), finetune=True))
            if seed:
                out.append(Cell(f"frozen-{t}-s{seed}", "continued", (t,), seed=seed, init=f"source-{t}",
                                evaluate=(t,), finetune=True, train=False))

    continued(0)
    for t in TARGETS:  # DINOv2-style vs DINO
        for method in ("dino", "dinov2"):
            out.append(Cell(f"{method}-{t}", "dinov2", (t,), method, "vit-tiny", budget=0.5, evaluate=(t,)))
    for t in TARGETS:  # layer-wise vs end-to-end autoencoder
        out.append(Cell(f"ae-{t}", "layerwise", (t,), "autoencoder", budget=0.5, evaluate=(t,)))
        out.append(Cell(f"ae-layerwise-{t}", "layerwise", (t,), "autoencoder", budget=0.5, evaluate=(t,),
                        sets=["method_options.layerwise=true"], calibrate_as=f"ae-{t}"))
        out.append(Cell(f"ae-layerwise-cpu-{t}", "layerwise", (t,), "autoencoder", budget=0.5, evaluate=(t,),
                        sets=["method_options.layerwise=true"], match_cpu=(f"ae-layerwise-{t}", f"ae-{t}")))
    for seed in SEEDS[1:]:
        continued(seed)
    for d in FOUR[2:]:  # one encoder for four data sets
        out.append(Cell(f"single-{d}", "union", (d,), evaluate=(d,)))
    out.append(Cell("union", "union", FOUR, budget=4.0, evaluate=FOUR))
    return out


# ------------------------------------------------------------------------------ one cell


def config_tree(c: Cell, epochs: float, budget_s: float, out: Path) -> dict:
    from medlatent.config import apply_set

    tree: dict = {"data": {"name": c.data[0]}, "method": c.method, "backbone": {"name": c.backbone},
                  "train": {"epochs": epochs, "seed": c.seed, "time_budget_s": budget_s, "log_every": 5}}
    if len(c.data) > 1:
        tree["data"]["mixture"] = list(c.data)
    if c.init:
        tree["backbone"]["init"] = str(out / "runs" / c.init)
    for s in c.sets:
        apply_set(tree, s)
    return tree


def calibrate(c: Cell, out: Path) -> float:
    """Images per CPU second of this cell's config (process CPU time, one thread)."""
    from medlatent.api import run_pretraining

    tmp = out / "runs" / f".calibrate-{c.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    marks: dict[str, float] = {}

    def on_progress(p) -> None:  # noqa: ANN001 - medlatent.train.loop.Progress
        if p.step == 3:
            marks["start"], marks["step"] = time.process_time(), 3
        marks["last"], marks["last_step"] = time.process_time(), p.step

    def should_stop() -> bool:
        return "start" in marks and marks["last"] - marks["start"] >= CALIBRATE_CPU_S

    from medlatent.api import make_config

    cfg = make_config(config_tree(c, 1000.0, 0.0, out))
    run_pretraining(cfg, tmp, on_progress=on_progress, should_stop=should_stop)
    shutil.rmtree(tmp, ignore_errors=True)
    steps = marks["last_step"] - marks["step"]
    return steps * cfg.train.batch_size / (marks["last"] - marks["start"])


def train_images(c: Cell) -> int:
    from medlatent.data.catalogue import split_size

    return sum(split_size(d, "train") for d in c.data)


def evaluate(c: Cell, run: Path) -> dict:
    """Probe (k-NN, linear) and, for ``c.finetune``, 10 %-label fine-tuning on each evaluation set."""
    from medlatent.api import label_efficiency, probe
    from medlatent.eval.finetune import FinetuneConfig

    results = {}
    for d in c.evaluate:
        test = {r["protocol"]: r for r in probe(run, data=d)["summary"] if r["split"] == "test"}
        r = dict(knn_acc=test["knn"]["acc"], knn_auc=test["knn"]["auc"],
                 linear_acc=test["linear"]["acc"], linear_auc=test["linear"]["auc"])
        if c.finetune:
            fixed = FinetuneConfig(lr_grid=None, encoder_lr_scale_grid=None)  # one protocol for every arm
            eff = label_efficiency(run, fractions=(0.1,), seeds=(c.seed,), protocols=("finetune",), data=d,
                                   finetune=fixed)
            row = next(x for x in eff["summary"] if x["protocol"] == "finetune" and x["split"] == "test")
            r.update(finetune10_acc=row["acc"], finetune10_auc=row["auc"])
        results[d] = r
    return results


def reconstruction_mse(run: Path, data: str) -> float:
    """Mean squared error of the autoencoder's reconstructions of the test split (standardised units)."""
    import torch

    from medlatent.config import DataConfig
    from medlatent.data.sources import load_dataset
    from medlatent.data.store import to_float
    from medlatent.methods.saved import load_method

    method, meta, _ = load_method(run)
    images = load_dataset(DataConfig(name=data)).splits["test"].images
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    total, n = 0.0, 0
    with torch.no_grad():
        for a in range(0, len(images), 512):
            x = (to_float(torch.as_tensor(images[a:a + 512])) - mean) / std
            total += float(((method.reconstruct(x) - x) ** 2).mean(dim=(1, 2, 3)).sum())
            n += len(x)
    return total / n


def run_cell(c: Cell, cpu_min: float, out: Path) -> dict:
    import torch

    from medlatent.api import attention, make_config, run_pretraining

    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    budget_cpu_s = c.budget * cpu_min * 60
    result = dict(cell=c.name, section=c.section, data=list(c.data), method=c.method, backbone=c.backbone,
                  seed=c.seed, init=c.init, sets=c.sets, cpu_budget_s=budget_cpu_s)
    if c.train:
        if c.match_cpu:
            same, ref = (_read(n) for n in c.match_cpu)
            ips = None
            epochs = round(ref["epochs"] * ref["train_cpu_s"] / same["train_cpu_s"], 2)
        else:
            ips = calibrate({x.name: x for x in cells()}[c.calibrate_as] if c.calibrate_as else c, out)
            epochs = round(budget_cpu_s * MARGIN * ips / train_images(c), 2)
        run = out / "runs" / c.name
        shutil.rmtree(run, ignore_errors=True)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        # wall-clock budget only as a safety net (3x): the epochs set the CPU budget
        _, fit = run_pretraining(make_config(config_tree(c, epochs, 3 * budget_cpu_s, out)), run)
        result.update(images_per_cpu_s=ips, epochs=epochs, steps=fit.step, total_steps=fit.total_steps,
                      status=fit.status, train_cpu_s=time.process_time() - cpu0,
                      train_wall_s=time.perf_counter() - wall0)
    else:
        run = out / "runs" / str(c.init)
    cpu1 = time.process_time()
    result["evaluation"] = evaluate(c, run)
    if c.method == "autoencoder":
        result["reconstruction_mse"] = reconstruction_mse(run, c.data[0])
    if c.backbone.startswith("vit"):
        result["attention_png"] = str(attention(run, n=6, out=out / f"attention-{c.name}.png"))
    result.update(eval_cpu_s=time.process_time() - cpu1, load_before=load_before, load_after=os.getloadavg()[0],
                  machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                               torch=torch.__version__, python=platform.python_version()))
    return result


def rebuild(c: Cell, out: Path) -> Path:
    """Train ``c``'s run folder again with the epochs its JSON recorded (no calibration, no evaluation).

    On one CPU thread training is deterministic given the config and the host's kernels, so on the
    host that wrote the JSON the folder holds the encoder its figures came from (on another, one trained
    the same way whose weights differ, rounding compounding over training); the step count is checked
    against the recorded one.
    """
    import torch

    from medlatent.api import make_config, run_pretraining

    torch.set_num_threads(1)
    recorded = _read(c.name)
    if recorded is None or "epochs" not in recorded:
        raise SystemExit(f"{RESULTS / (c.name + '.json')}: no recorded training to rebuild from")
    run = out / "runs" / c.name
    shutil.rmtree(run, ignore_errors=True)
    # The recorded epochs set the length; the CPU cap only stops a runaway. It is 10x the recorded
    # budget because hosts differ: one AVX2-only EPYC trained these ResNets 2.5-3x slower than the
    # host the JSONs came from (the step check below still says whether the run is the same length).
    _, fit = run_pretraining(make_config(config_tree(c, recorded["epochs"], 10 * recorded["cpu_budget_s"], out)), run)
    if fit.step != recorded["steps"]:
        raise SystemExit(f"{run}: rebuilt to step {fit.step}, the recorded run stopped at {recorded['steps']}")
    return run


# ------------------------------------------------------------------------------ driver and table


def drive(todo: list[Cell], cpu_min: float, jobs: int, out: Path) -> None:
    """Run the cells not yet done, ``jobs`` at a time, each after the cell it starts from."""
    running: dict[str, subprocess.Popen] = {}
    pending = [c for c in todo if not (RESULTS / f"{c.name}.json").exists()]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    while pending or running:
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                print(f"{time.strftime('%H:%M:%S')} {name}: {'done' if proc.returncode == 0 else 'FAILED'}", flush=True)
        for c in list(pending):
            if len(running) >= jobs:
                break
            if c.init and c.init in running:
                continue
            if c.init and not (RESULTS / f"{c.init}.json").exists():
                if not any(p.name == c.init for p in pending):
                    pending.remove(c)  # its source failed or was not selected
                    print(f"skip {c.name}: needs {c.init}", flush=True)
                continue
            pending.remove(c)
            log = (out / f"{c.name}.log").open("w")
            running[c.name] = subprocess.Popen([sys.executable, __file__, "--cell", c.name, "--cpu-min", str(cpu_min),
                                                "--out-dir", str(out)], stdout=log, stderr=subprocess.STDOUT, env=env)
            print(f"{time.strftime('%H:%M:%S')} {c.name}: started", flush=True)
        time.sleep(2)


def _read(name: str) -> dict | None:
    f = RESULTS / f"{name}.json"
    return json.loads(f.read_text()) if f.exists() else None


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} ({len(values)})"


def table() -> str:
    lines = []
    lines.append("\n**Continued pretraining** (SimCLR, ResNet-18/4, 28 px; test ACC, mean ± sd over seeds)\n")
    lines.append("| data | start | further SSL | linear ACC | 10 %-label fine-tune ACC |")
    lines.append("| --- | --- | --- | --- | --- |")
    for t in TARGETS:
        for arm, label, ssl in (("init", "other three data sets", "yes"), ("random", "random", "yes"),
                                ("frozen", "other three data sets", "no")):
            rs = [_read(f"{arm}-{t}-s{s}") if not (arm == "frozen" and s == 0) else _read(f"source-{t}")
                  for s in SEEDS]
            rs = [r["evaluation"][t] for r in rs if r]
            lines.append(f"| {t} | {label} | {ssl} | {_mean_sd([r['linear_acc'] for r in rs])} | "
                         f"{_mean_sd([r['finetune10_acc'] for r in rs if 'finetune10_acc' in r])} |")
    lines.append("\n**One encoder for four data sets** (SimCLR, ResNet-18/4; linear-probe test ACC)\n")
    lines.append("| data | its own encoder (B) | union of four (4B) |")
    lines.append("| --- | --- | --- |")
    union = _read("union")
    for d in FOUR:
        own = _read(f"random-{d}-s0" if d in TARGETS else f"single-{d}")
        a = f"{own['evaluation'][d]['linear_acc']:.3f}" if own else "-"
        b = f"{union['evaluation'][d]['linear_acc']:.3f}" if union else "-"
        lines.append(f"| {d} | {a} | {b} |")
    lines.append("\n**DINOv2-style vs DINO** (ViT-tiny, 28 px; test split)\n")
    lines.append("| data | method | CPU-min | epochs | k-NN ACC | linear ACC | linear AUC |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for t in TARGETS:
        for m in ("dino", "dinov2"):
            r = _read(f"{m}-{t}")
            if r:
                e = r["evaluation"][t]
                lines.append(f"| {t} | {m} | {r['train_cpu_s'] / 60:.1f} | {r['epochs']:g} | {e['knn_acc']:.3f} | "
                             f"{e['linear_acc']:.3f} | {e['linear_auc']:.3f} |")
    lines.append("\n**Layer-wise vs end-to-end autoencoder** (ResNet-18/4, 28 px; test split)\n")
    lines.append("| data | training | CPU-min | epochs | reconstruction MSE | k-NN ACC | linear ACC |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for t in TARGETS:
        for name, label in ((f"ae-{t}", "end to end"), (f"ae-layerwise-{t}", "layer-wise, then end to end (same epochs)"),
                            (f"ae-layerwise-cpu-{t}", "layer-wise, then end to end (same CPU)")):
            r = _read(name)
            if r:
                e = r["evaluation"][t]
                lines.append(f"| {t} | {label} | {r['train_cpu_s'] / 60:.1f} | {r['epochs']:g} | "
                             f"{r['reconstruction_mse']:.4f} | {e['knn_acc']:.3f} | {e['linear_acc']:.3f} |")
    done = [json.loads(f.read_text()) for f in sorted(RESULTS.glob("*.json"))]
    for section in sorted({r["section"] for r in done}):
        rs = [r for r in done if r["section"] == section and "train_cpu_s" in r]
        if rs:
            budgets = ", ".join(sorted({f"{r['cpu_budget_s'] / 60:g}" for r in rs}))
            used = [r["train_cpu_s"] / 60 for r in rs]
            lines.append(f"\n{section}: {len(rs)} training cells; budget {budgets} CPU-min; "
                         f"training used {min(used):.1f}-{max(used):.1f} CPU-min.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-min", type=float, default=10.0, help="B: CPU-minutes of pretraining per unit budget")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default="*", help="fnmatch pattern on cell names")
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=str(OUT))
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--rebuild", default=None, help="fnmatch pattern: train these cells' run folders again")
    args = ap.parse_args()
    out = Path(args.out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    by_name = {c.name: c for c in cells()}
    if args.rebuild:
        for c in cells():
            if c.train and fnmatch.fnmatch(c.name, args.rebuild):
                run = rebuild(c, out)
                print(f"{time.strftime('%H:%M:%S')} rebuilt {run}", flush=True)
        return
    if args.cell:
        result = run_cell(by_name[args.cell], args.cpu_min, out)
        RESULTS.mkdir(parents=True, exist_ok=True)
        tmp = RESULTS / f".{args.cell}.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(RESULTS / f"{args.cell}.json")
        print(json.dumps({k: v for k, v in result.items() if k != "machine"}))
        return
    if not args.table_only:
        drive([c for c in cells() if fnmatch.fnmatch(c.name, args.only)], args.cpu_min, args.jobs, out)
    print(table())


if __name__ == "__main__":
    main()
