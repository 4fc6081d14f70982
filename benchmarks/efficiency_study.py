"""Label efficiency on four MedMNIST subsets: every protocol at 1/10/25/100 % of the labels, 3 seeds.

Data: BloodMNIST, PneumoniaMNIST, BreastMNIST, RetinaMNIST (28 px, the shared official files).
Encoders: one SimCLR ResNet-18/4 per data set, pretrained on that set's train images (no labels)
for 10 CPU-minutes on one thread with the current views (``benchmarks/foundation.py``: cells
``random-<data>-s0`` and ``single-<data>``). Protocols (``medlatent.eval.session.PROTOCOLS``):
supervised from scratch, k-NN and linear probe (frozen), fine-tuning, LP-FT, FixMatch from scratch
and from the encoder; each trained protocol chooses its learning rate and encoder scale on val
from the same grid (``FinetuneConfig``: 6 candidates at a quarter budget, the best retrained),
so the baseline is tuned exactly as the self-supervised protocols are. Synthetic-image cells
(1 % and 10 %): a classifier with and without the samples of a class-conditional DDPM that saw
only the cell's labels (``synthetic_rows``). The encoders' run folders are not committed:
``python benchmarks/foundation.py --rebuild 'random-*-s0'`` and ``--rebuild 'single-*'`` train
them again from the epochs their JSONs recorded, bit for bit on one thread of the kind of host that
trained them (checked against ``ENCODER_SHA256``: a cell that uses the weights of another rebuild is
not written into the study).

A cell is (data set, protocol, fraction, seed): one process on one thread, one JSON under
``benchmarks/results/efficiency_study/<data>/`` (its log under ``benchmarks/out/``) with the
test (and val) row, the chosen learning rate, the process CPU seconds and the command that
reproduces it. A rerun skips the cells already there, so the study can be finished over
several sessions; ``--table-only`` prints the tables, the target checks and writes one figure
per data set from whatever cells exist.
The frozen probes share one cell (``frozen``: k-NN and linear from the same features). Cells
run through ``RunEvaluation`` directly, so no cell writes into an encoder's run folder and two
cells on one encoder may run side by side.

    python benchmarks/efficiency_study.py --jobs 2                         # every cell not yet done
    python benchmarks/efficiency_study.py --only 'breastmnist/*' --jobs 2  # fnmatch on <data>/<cell>
    python benchmarks/efficiency_study.py --table-only
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

OUT = Path("benchmarks/results/efficiency_study")  # one JSON per cell (committed)
LOGS = Path("benchmarks/out/efficiency_study")  # one log per cell (not committed)
ENCODERS = Path("benchmarks/out/foundation/runs")
DATASETS = ("bloodmnist", "pneumoniamnist", "breastmnist", "retinamnist")
FRACTIONS = (0.01, 0.1, 0.25, 1.0)
SEEDS = (0, 1, 2)
TRAINED = ("supervised", "finetune", "lpft", "semi-scratch", "semi")
# cheap protocols first, so a partial study already has every data set's frozen and supervised rows
ORDER = ("frozen", "supervised", "finetune", "lpft", "semi-scratch", "semi", "synthetic")
SYNTHETIC_FRACTIONS = (0.01, 0.1)
# the rows of the tables and the lines of the figures (the frozen cell gives knn and linear)
SHOWN = ("supervised", "knn", "linear", "finetune", "lpft", "semi-scratch", "semi", "synthetic-real", "synthetic")
# The synthetic cells' generator (``generate augment --protocol fraction``): a class-conditional
# v-prediction DDPM trained on every train image with only the fraction's labels (the rest are
# classifier-free guidance's null class), 400 optimiser steps (about 10 CPU-min on one thread at
# 28 px on an AVX-512 host), then 500 class-balanced DDIM samples (50 steps) beside the real
# fraction. The step count sets the length on every host; the wall-clock cap (10x the fast host's
# time) only stops a runaway, and a generator it cut short fails the cell (``synthetic_rows``).
GENERATOR = dict(method="ddpm", steps=400, budget_s=6000.0, n_synthetic=500)
# MedMNIST v2 (Yang et al. 2023, Table 3): ResNet-18 (28), supervised on every train label, test ACC
PUBLISHED_RESNET18_28 = {"bloodmnist": 0.958, "pneumoniamnist": 0.854, "breastmnist": 0.863, "retinamnist": 0.524}


# The study's encoders by the sha256 of their weights (``fingerprint``). ``foundation.py --rebuild``
# reproduces them bit for bit on the kind of host that trained them (a 2-core AMD EPYC with AVX-512
# BF16, where these were checked); a rebuild on other kernels is the same recipe with other weights,
# so cells that use the weights are written to the study only from these.
ENCODER_SHA256 = {
    "bloodmnist": "c3d240e05750775b6dd5d9ab328c6daf3f0aebf69c817c2c519fe5c091c4af1f",
    "pneumoniamnist": "e422f59e82f6dafa1649a7de0bf5f00e55784abfb59dba2fcdda64423942c7a2",
    "breastmnist": "1c41c31533a78fc56cd862985abf5a2549fae8f6703302fb52b941a7debb07f4",
    "retinamnist": "97206c2fe3613f79b495b61f2e27d78aba05fe951a8709c912c0de5e40a3ec6c",
}
USES_WEIGHTS = ("frozen", "finetune", "lpft", "semi")  # supervised and semi-scratch start from random weights


def encoder_run(data: str) -> Path:
    """The SimCLR encoder of ``data`` (10 CPU-minutes, seed 0) from the foundation benchmark."""
    name = f"random-{data}-s0" if data in ("bloodmnist", "pneumoniamnist") else f"single-{data}"
    return ENCODERS / name


@dataclass(frozen=True)
class Cell:
    """One (data set, protocol, fraction, seed); ``protocol`` ``frozen`` = k-NN and linear probe."""

    data: str
    protocol: str
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.data}/{self.protocol}-{self.fraction:g}-s{self.seed}"

    def file(self, out: Path) -> Path:
        return out / self.data / f"{self.protocol}-{self.fraction:g}-s{self.seed}.json"


def cells() -> list[Cell]:
    """Every cell: by protocol (cheap first), then data set (small first), fraction and seed."""
    small_first = ("breastmnist", "retinamnist", "pneumoniamnist", "bloodmnist")
    return [Cell(d, p, f, s) for p in ORDER for d in small_first
            for f in (SYNTHETIC_FRACTIONS if p == "synthetic" else FRACTIONS) for s in SEEDS]


def synthetic_rows(c: Cell) -> tuple[list[dict], dict]:
    """A classifier on the cell's labelled fraction alone (protocol ``synthetic-real``) and with a
    generator's samples added (``synthetic``), that generator having seen only those labels.

    The cell's own folder under ``benchmarks/out/`` holds the template run that
    ``api.synthetic_augmentation`` takes its config from (trained for one second, itself on the
    fraction's labels only, never sampled) and the fraction's generator; one folder per cell, so
    two cells never write one run folder. Returns (test rows, the experiment's gains).
    """
    from medlatent.api import make_config, run_pretraining, synthetic_augmentation

    template = LOGS / "generators" / f"{c.data}-{c.fraction:g}-s{c.seed}"
    if not (template / "checkpoints").exists():
        tree = {"data": {"name": c.data, "label_fraction": c.fraction, "label_seed": c.seed},
                "method": GENERATOR["method"], "method_options": {"conditional": True},
                "train": {"epochs": 1, "time_budget_s": 1, "seed": c.seed, "device": "cpu"}}
        run_pretraining(make_config(tree), template)
    result = synthetic_augmentation(template, fractions=(c.fraction,), seeds=(c.seed,), device="cpu",
                                    n_synthetic=GENERATOR["n_synthetic"], generator_steps=GENERATOR["steps"],
                                    generator_budget_s=GENERATOR["budget_s"])
    if result["leaks_labels"]:
        raise SystemExit(f"{template}: a generator saw labels the classifier did not have")
    short = [r["generator_step"] for r in result["rows"] if r["generator_step"] != GENERATOR["steps"]]
    if short:
        raise SystemExit(f"{template}: the generator stopped at step {short[0]}, not {GENERATOR['steps']} "
                         f"(its {GENERATOR['budget_s']:g} s cap): no result written; remove the folder to train it again")
    rows = [dict(r, split="test", protocol="synthetic" if r["training"] == "real + synthetic" else "synthetic-real")
            for r in result["rows"]]
    return rows, result["gains"]


def fingerprint(encoder: "torch.nn.Module") -> str:
    """sha256 over the encoder's state dict (names and raw tensor bytes, in order): two cells with the
    same fingerprint used the same weights. A rebuild on another host (other kernels, other rounding)
    gives another fingerprint (``ENCODER_SHA256`` holds the study's)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in encoder.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_cell(c: Cell, out: Path) -> dict:
    """Evaluate one cell in this process (one thread); returns its JSON record (for ``out``)."""
    import torch

    from medlatent.eval.finetune import FinetuneConfig
    from medlatent.eval.semi import SemiConfig
    from medlatent.eval.session import RunEvaluation
    from medlatent.train.precision import cpu_model

    torch.set_num_threads(1)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    splits = ("val", "test")
    in_study = out.resolve() == OUT.resolve()
    extra: dict = {}
    if c.protocol == "synthetic":  # no encoder: a classifier from scratch with and without the samples
        rows, extra["gains"] = synthetic_rows(c)
    else:
        ev = RunEvaluation(encoder_run(c.data), None, None, "cpu")
        sha = fingerprint(ev.encoder)
        if c.protocol in USES_WEIGHTS and in_study and sha != ENCODER_SHA256[c.data]:
            raise SystemExit(f"{encoder_run(c.data)}: encoder sha256 {sha[:12]}..., not the study's "
                             f"{ENCODER_SHA256[c.data][:12]}... (rebuilt on other CPU kernels?); {c.name} not "
                             f"written: run it with --out-dir elsewhere")
        extra.update(encoder=str(encoder_run(c.data)), encoder_step=ev.step, encoder_sha256=sha)
        if c.protocol == "frozen":
            rows = ev.frozen_rows(c.fraction, c.seed, splits)
        else:
            rows = ev.trained_rows(c.fraction, c.seed, splits, FinetuneConfig(), c.protocol, None, SemiConfig())
    return dict(cell=c.name, data=c.data, protocol=c.protocol, fraction=c.fraction, seed=c.seed, rows=rows, **extra,
                cpu_s=time.process_time() - cpu0, wall_s=time.perf_counter() - wall0,
                command="python benchmarks/efficiency_study.py"
                        + ("" if in_study else f" --out-dir {out}") + f" --only '{c.name}'",
                machine=dict(cpu=platform.processor() or platform.machine(), model=cpu_model(), cores=os.cpu_count(),
                             kernels=torch.backends.cpu.get_cpu_capability(),
                             torch=torch.__version__, python=platform.python_version()))


def drive(todo: list[Cell], jobs: int, out: Path) -> None:
    """Run the cells not yet done, ``jobs`` processes at a time (one thread each); skip the cells of a
    data set whose encoder run is missing, with one line (synthetic cells use none and still run)."""
    pending = [c for c in todo if not c.file(out).exists()]
    needs_encoder = [c for c in pending if c.protocol != "synthetic"]
    missing = sorted({c.data for c in needs_encoder if not (encoder_run(c.data) / "checkpoints").exists()})
    for d in missing:
        print(f"skip {d}: no encoder at {encoder_run(d)} (python benchmarks/foundation.py --rebuild "
              f"'{encoder_run(d).name}' trains it again from its recorded epochs)", flush=True)
    pending = [c for c in pending if c.protocol == "synthetic" or c.data not in missing]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    running: dict[Cell, subprocess.Popen] = {}
    while pending or running:
        for c, proc in list(running.items()):
            if proc.poll() is not None:
                del running[c]
                print(f"{time.strftime('%H:%M:%S')} {c.name}: {'done' if proc.returncode == 0 else 'FAILED'}",
                      flush=True)
        while pending and len(running) < jobs:
            c = pending.pop(0)
            c.file(out).parent.mkdir(parents=True, exist_ok=True)
            (LOGS / c.data).mkdir(parents=True, exist_ok=True)
            log = c.file(LOGS).with_suffix(".log").open("w")
            running[c] = subprocess.Popen([sys.executable, __file__, "--cell", c.name, "--out-dir", str(out)],
                                          stdout=log, stderr=subprocess.STDOUT, env=env)
            print(f"{time.strftime('%H:%M:%S')} {c.name}: started", flush=True)
        time.sleep(2)


# ------------------------------------------------------------------------------ tables and figure


def load(out: Path) -> list[dict]:
    """Every finished cell's test rows, flattened: dicts with data, protocol, fraction, seed, acc, auc, cpu_s."""
    rows = []
    for f in sorted(out.glob("*/*.json")):
        r = json.loads(f.read_text())
        for row in r["rows"]:
            if row["split"] == "test":
                rows.append(dict(data=r["data"], protocol=row["protocol"], fraction=r["fraction"], seed=r["seed"],
                                 acc=row["acc"], auc=row["auc"], cpu_s=r["cpu_s"], lr=row.get("lr"),
                                 encoder_lr_scale=row.get("encoder_lr_scale")))
    return rows


def stats(rows: list[dict], key: str) -> tuple[float, float, int] | None:
    """(mean, sd, n) of ``key`` over rows (sd 0 for one row); None for no rows."""
    values = [r[key] for r in rows]
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def fmt(s: tuple[float, float, int] | None) -> str:
    if s is None:
        return "-"
    mean, sd, n = s
    return f"{mean:.3f} ± {sd:.3f}" + ("" if n == 3 else f" ({n})")


def table(rows: list[dict], data: str) -> str:
    """Markdown: protocol x fraction, test ACC (AUC below), mean ± sd over seeds, and CPU-minutes per cell."""
    mine = [r for r in rows if r["data"] == data]
    lines = [f"\n**{data}** (test ACC / AUC, mean ± sd over seeds; CPU-min: mean per cell)\n",
             "| protocol | " + " | ".join(f"{f:.0%}" for f in FRACTIONS) + " | CPU-min |",
             "| --- |" + " --- |" * (len(FRACTIONS) + 1)]
    for p in SHOWN:
        got = [r for r in mine if r["protocol"] == p]
        if not got:
            continue
        cols = []
        for f in FRACTIONS:
            at = [r for r in got if r["fraction"] == f]
            cols.append(f"{fmt(stats(at, 'acc'))} / {fmt(stats(at, 'auc'))}" if at else "-")
        lines.append(f"| {p} | " + " | ".join(cols) + f" | {statistics.mean(r['cpu_s'] for r in got) / 60:.1f} |")
    return "\n".join(lines)


def checks(rows: list[dict], data: str) -> list[str]:
    """The study's targets on one data set, each as a line saying met / missed and by how much."""
    lines = []

    def verdict(ok: bool, *parts: tuple[float, float, int] | None, protocols: int = 1, of: int = 1) -> str:
        n = min(x[2] for x in parts if x)
        if n == len(SEEDS) and protocols == of:
            return "met" if ok else "MISSED"
        seeds = f"{n} seed{'s' * (n > 1)}" + (f", {protocols} of {of} protocols" if of > 1 else "")
        return f"{'ahead' if ok else 'behind'} so far ({seeds})"

    def acc(p: str, f: float) -> tuple[float, float, int] | None:
        return stats([r for r in rows if r["data"] == data and r["protocol"] == p and r["fraction"] == f], "acc")

    for f in FRACTIONS:
        base = acc("supervised", f)
        ours = ("knn", "linear", "finetune", "lpft", "semi", "semi-scratch")
        best = max(((p, acc(p, f)) for p in ours if acc(p, f)), key=lambda x: x[1][0], default=None)
        complete = sum(1 for p in ours if acc(p, f) and acc(p, f)[2] == len(SEEDS))
        if base and best:
            margin = 0.01 if f <= 0.1 else 0.0
            diff = best[1][0] - base[0]
            ok = diff >= margin
            lines.append(f"{data} {f:.0%}: best {best[0]} {best[1][0]:.3f} vs supervised {base[0]:.3f} "
                         f"({diff:+.3f}; needs {'+' if margin else '>= '}{margin:.2f}) "
                         f"{verdict(ok, base, best[1], protocols=complete, of=len(ours))}")
        ft, lin = acc("finetune", f), acc("linear", f)
        if ft and lin:
            spread = max(ft[1], lin[1])
            ok = ft[0] >= lin[0] - spread
            lines.append(f"{data} {f:.0%}: fine-tune {ft[0]:.3f} vs linear {lin[0]:.3f} (seed sd {spread:.3f}) "
                         f"{verdict(ok, ft, lin)}")
    for f in SYNTHETIC_FRACTIONS:
        pair = {(r["seed"], r["protocol"]): r["acc"] for r in rows if r["data"] == data and r["fraction"] == f
                and r["protocol"] in ("synthetic", "synthetic-real")}
        gains = [pair[(s, "synthetic")] - pair[(s, "synthetic-real")] for s in SEEDS if (s, "synthetic") in pair]
        if gains:
            g = (statistics.mean(gains), statistics.pstdev(gains), len(gains))  # ddof 0, as generate augment
            head = f"{data} {f:.0%}: synthetic images {g[0]:+.3f} ± {g[1]:.3f} ACC (paired by seed"
            if f == 0.01:  # the target's fraction
                lines.append(f"{head}; needs > 2 sd) {verdict(g[0] > 2 * g[1], g)}")
            else:  # reported beside it
                lines.append(f"{head}, {g[2]} seeds): {'beyond' if abs(g[0]) > 2 * g[1] else 'within'} 2 sd "
                             f"(reported; the target is at 1 %)")
    full = [a for a in (acc("finetune", 1.0), acc("lpft", 1.0)) if a]
    if full:
        best = max(full, key=lambda a: a[0])
        target = PUBLISHED_RESNET18_28[data]
        lines.append(f"{data} 100%: fine-tuned {best[0]:.3f} vs published ResNet-18 (28) {target:.3f} "
                     f"({best[0] - target:+.3f}) {verdict(best[0] >= target, best)}")
    return lines


def figure(rows: list[dict], data: str, path: Path) -> None:
    """Test ACC against the label fraction (log axis), one line per protocol, error bars = sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for p in SHOWN:
        pts = [(f, stats([r for r in rows if r["data"] == data and r["protocol"] == p and r["fraction"] == f], "acc"))
               for f in FRACTIONS]
        pts = [(f, s) for f, s in pts if s]
        if pts:
            ax.errorbar([f for f, _ in pts], [s[0] for _, s in pts], yerr=[s[1] for _, s in pts], marker="o",
                        capsize=3, label=p, linestyle="--" if p == "supervised" else "-")
    ax.set_xscale("log")
    ax.set_xticks(FRACTIONS, [f"{f:.0%}" for f in FRACTIONS])
    ax.set_xlabel("labelled fraction of the train split")
    ax.set_ylabel("test ACC")
    ax.set_title(f"{data} (28 px, SimCLR ResNet-18/4 encoder)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", nargs="+", default=["*"], help="fnmatch patterns on <data>/<protocol>-<fraction>-s<seed>")
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=str(OUT))
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out_dir)
    if args.cell:
        c = {x.name: x for x in cells()}[args.cell]
        result = run_cell(c, out)
        c.file(out).parent.mkdir(parents=True, exist_ok=True)
        tmp = c.file(out).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(c.file(out))  # published whole: a killed cell leaves no result to skip
        print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "machine")}))
        return
    if not args.table_only:
        drive([c for c in cells() if any(fnmatch.fnmatch(c.name, p) for p in args.only)], args.jobs, out)
    rows = load(out)
    for d in DATASETS:
        if any(r["data"] == d for r in rows):
            print(table(rows, d))
            figure(rows, d, out / f"{d}.png")
    print()
    for d in DATASETS:
        for line in checks(rows, d):
            print(line)


if __name__ == "__main__":
    main()
