"""Probe a kept pretraining run again and update its result file from ``pretrain_probe.py``
(after a change to the read-out or the probes; the pretraining itself is not repeated).

    python benchmarks/reprobe.py benchmarks/out/ssl_methods_5min/run-ijepa-bloodmnist-... \
        benchmarks/out/ssl_methods_5min/ijepa_bloodmnist.json --note "CLS read-out"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medlatent.api import probe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="the run folder (its config.yaml decides the read-out)")
    ap.add_argument("result", help="the JSON written by pretrain_probe.py for this run")
    ap.add_argument("--note", required=True, help="why it was probed again (kept in the JSON)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    summary = probe(args.run, splits=("val", "test"))["summary"]
    test = {r["protocol"]: r for r in summary if r["split"] == "test"}
    path = Path(args.result)
    r = json.loads(path.read_text())
    r["reprobed"] = dict(note=args.note, before=dict(knn=r["knn_test"]["acc"], linear=r["linear_test"]["acc"]),
                         probe_s=time.perf_counter() - t0)
    r["knn_test"], r["linear_test"], r["probe_s"] = test["knn"], test["linear"], r["reprobed"]["probe_s"]
    path.write_text(json.dumps(r, indent=1))
    print(json.dumps(dict(run=args.run, knn_acc=round(test["knn"]["acc"], 4), linear_acc=round(test["linear"]["acc"], 4),
                          before=r["reprobed"]["before"])))


if __name__ == "__main__":
    main()
