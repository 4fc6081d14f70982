"""The run report: one self-contained HTML page (figures inlined as base64, no network).

A small inline script marks, once the page has loaded, how many of its images decoded
(``<body data-images="7/7">``); ``scripts/check_report.py`` reads that back from a headless
Chromium to prove every figure loaded.
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medlatent.config import PretrainConfig, to_dict
from medlatent.eval.published import protocol_rows
from medlatent.train.runs import RunDir

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; } th { background: #f3f3f3; }
td.l, th.l { text-align: left; } img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; font-size: 0.8em; overflow-x: auto; }
.muted { color: #777; font-size: 0.85em; }
"""
CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
});
</script>"""


def _img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).is_file():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any, tag: str, i: int) -> str:
        text = f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))
        cls = ' class="l"' if i == 0 else ""
        return f"<{tag}{cls}>{html.escape(text)}</{tag}>"

    head = "".join(cell(h, "th", i) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell(v, "td", i) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary_table(summary: list[dict]) -> str:
    rows = [[r["protocol"], r["split"], f"{r['fraction']:.0%}", r["n_seeds"],
             f"{r['acc']:.3f}" + (f" ± {r['acc_std']:.3f}" if r["n_seeds"] > 1 else ""),
             f"{r['auc']:.3f}" + (f" ± {r['auc_std']:.3f}" if r["n_seeds"] > 1 else ""), r["balanced_acc"]]
            for r in sorted(summary, key=lambda r: (r["split"], r["fraction"], r["protocol"]))]
    return _table(["protocol", "split", "labels", "seeds", "ACC", "AUC", "balanced ACC"], rows)


@dataclass
class ReportInputs:
    """What a run report shows, computed beforehand (see ``medlatent.api.report``).

    Attributes:
        run: the run folder; cfg: its config.
        data_name, task: the labelled data evaluated on; step: the encoder's step.
        probe: ``medlatent probe``'s result; retrieval: precision@k (split, gallery, precision@...).
        efficiency: ``label_efficiency.json`` when it exists.
        figures: PNGs by name: curves, map, retrieval, confusion, efficiency (None: not drawn).
    """

    run: RunDir
    cfg: PretrainConfig
    data_name: str
    task: str | None
    step: int
    probe: dict[str, Any]
    retrieval: dict[str, Any]
    efficiency: dict[str, Any] | None
    figures: dict[str, Path | None] = field(default_factory=dict)


def write_report(inputs: ReportInputs, out: Path | None = None) -> Path:
    """Lay out ``<run>/report.html`` from results and figures that already exist."""
    run, cfg, probe, retrieval, efficiency = inputs.run, inputs.cfg, inputs.probe, inputs.retrieval, inputs.efficiency
    curves, emb_map, conf = (inputs.figures.get(k) for k in ("curves", "map", "confusion"))
    env = run.read_json("env.json")
    metrics = run.read_metrics()
    last = next((m for m in reversed(metrics) if "loss" in m), {})
    parts = [f"<h1>medlatent run: {html.escape(run.path.name)}</h1>",
             f'<p class="muted">{html.escape(cfg.method)} · {html.escape(cfg.backbone.name)} · '
             f'{html.escape(inputs.data_name)} ({html.escape(str(inputs.task))}) · encoder at step {inputs.step} · '
             f'{html.escape(str(env.get("cuda") or env.get("cpu")))} · torch {html.escape(env.get("torch", ""))} · '
             f'{html.escape(env.get("autocast", ""))}</p>',
             "<h2>Training</h2>",
             _table(["steps", "final loss", "last img/s", "time (s)"],
                    [[last.get("step"), last.get("loss"), last.get("images_per_s"), last.get("time_s")]]),
             _img(curves, "training curves"),
             "<h2>Frozen-encoder probes</h2>", _summary_table(probe["summary"]),
             '<p class="muted">k-NN: weighted vote of the 20 most similar training images (cosine, T = 0.07). '
             "Linear: logistic regression on frozen features, L2 penalty chosen on val. ACC and AUC as MedMNIST "
             "computes them.</p>"]
    if efficiency:
        parts += ["<h2>Label efficiency</h2>", _img(inputs.figures.get("efficiency"), "label efficiency"),
                  _summary_table(efficiency["summary"]),
                  f'<p class="muted">Each protocol against training from scratch, per label fraction '
                  f'(test ACC): {html.escape(_crossover_text(efficiency["crossover"]))}.</p>']
    parts += ["<h2>Embedding map</h2>", _img(emb_map, "embedding map"),
              "<h2>Retrieval</h2>",
              _table(["gallery", "queries"] + [k for k in retrieval if k.startswith("precision@")],
                     [[retrieval["gallery"], retrieval["split"]] +
                      [retrieval[k] for k in retrieval if k.startswith("precision@")]]),
              _img(inputs.figures.get("retrieval"), "retrieval")]
    if conf is not None:
        parts += ["<h2>Confusion matrix</h2>", _img(conf, "confusion matrix")]
    for name, title in (("attention.png", "Attention maps"), ("reconstruction.png", "Reconstructions")):
        if (run.path / name).is_file():
            parts += [f"<h2>{title}</h2>", _img(run.path / name, title)]
    published = protocol_rows(inputs.data_name)
    if published:
        parts += ["<h2>Published results (test split, 28 px)</h2>",
                  _table(["source", "protocol", "ACC", "AUC"],
                         [list(p) for p in published])]
    parts += ["<h2>Configuration</h2>", f"<pre>{html.escape(yaml.safe_dump(to_dict(cfg), sort_keys=False))}</pre>",
              "<h2>Environment</h2>", f"<pre>{html.escape(json.dumps(env, indent=1))}</pre>"]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>medlatent: {html.escape(run.path.name)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}{CHECK}</body></html>")
    return _write(out or run.path / "report.html", page)


def _crossover_text(crossover: dict[str, Any]) -> str:
    """``linear probe: wins at 1% (+2.1 points), loses at 10% (-0.8); k-NN: ...`` (the CLI's words)."""
    from medlatent.eval.session import crossover_words

    names = {"knn": "k-NN", "linear": "linear probe", "finetune": "fine-tuning", "lpft": "LP-FT",
             "semi": "FixMatch (pretrained)", "semi-scratch": "FixMatch from scratch"}
    parts = []
    for protocol, c in crossover.items():
        if c is not None and "wins" in c:
            parts.append(f"{names.get(protocol, protocol)}: {crossover_words(c)}")
        elif c is not None:  # label_efficiency.json written before wins/losses were recorded
            parts.append(f"{names.get(protocol, protocol)}: beats it at "
                         f"{', '.join(f'{f:.0%}' for f in c['beats_scratch_at']) or 'no fraction'}")
    return "; ".join(parts) or "no supervised baseline was run"


def compare_runs(runs: list[Path], out: Path | None = None) -> tuple[str, Path | None]:
    """Markdown table of several runs' settings and test results (from their probe.json)."""
    header = ["run", "method", "backbone", "data", "steps", "k-NN ACC", "k-NN AUC", "linear ACC", "linear AUC"]
    rows = []
    for path in runs:
        run = RunDir(path)
        cfg = run.read_config()
        probe = run.read_json("probe.json") if (path / "probe.json").is_file() else {"summary": [], "encoder_step": None}
        test = {r["protocol"]: r for r in probe["summary"] if r["split"] == "test" and r["fraction"] == 1.0}
        rows.append([path.name, cfg.method, cfg.backbone.name, cfg.data.name, probe["encoder_step"],
                     *(test.get(p, {}).get(m) for p in ("knn", "linear") for m in ("acc", "auc"))])
    md = "| " + " | ".join(header) + " |\n|" + " --- |" * len(header) + "\n"
    md += "\n".join("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))
                                      for v in r) + " |" for r in rows)
    written = None
    if out is not None:
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>medlatent: compare</title>"
                f"<style>{STYLE}</style></head><body><h1>Runs compared</h1>{_table(header, rows)}"
                f'<p class="muted">Run "medlatent probe RUN" first for a run without results.</p>{CHECK}</body></html>')
        written = _write(out, page)
    return md, written


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
