"""Aggregate many runs' results.json into mean +- 95% confidence-interval tables (markdown and CSV).

Runs are grouped by everything that defines an experiment: stage, method, the
dataset, shots and classes the prompts were trained on, backbone and weights,
and every other setting that can change a result (``experiment``); the seeds
of a group are its samples, and two results of one experiment with the same
seed (a copied run folder) are refused. Every evaluated test set is a row: the
own test set (with base, new and harmonic mean for base-to-new) and each
cross-dataset or domain-shift set. The interval is mean +- t_{0.975, n-1} * s /
sqrt(n) (Student's t; no interval for a single run).
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path

from .config import RESUMABLE_CHANGES

METRICS = ("top1", "base", "new", "hm", "accuracy", "exact_match", "loss", "perplexity")
UNSCALED = {"loss", "perplexity"}  # the others are fractions, shown in %
# Settings that never change a result (or are the sample index: the seed).
NOT_DEFINING = RESUMABLE_CHANGES | {"seed"}
SHOWN = ("stage", "method", "model", "pretrained", "dataset", "shots", "subsample")


def find_results(paths) -> list[dict]:
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"report: no such file or folder {path}")
        files = [path] if path.is_file() else sorted(path.rglob("results*.json"))
        for file in files:
            try:
                found.append({**json.loads(file.read_text()), "_file": str(file)})
            except json.JSONDecodeError as exc:
                raise ValueError(f"report: {file} is not valid JSON: {exc}") from exc
    if not found:
        raise FileNotFoundError(f"report: no results.json (or results-*.json) under {', '.join(map(str, paths))}")
    return found


def experiment(result: dict) -> dict:
    """What defines the experiment of a result (everything but the seed): the shown fields, then
    the settings of the run that produced the prompts (``trained``, else the run's own)."""
    settings = result.get("trained") or result.get("settings") or {}
    own = result.get("settings") or {}
    defining = {k: v for k, v in settings.items() if k not in _not_defining(result)}
    if result["stage"] == "tpt":  # how the test-time step ran defines a TPT experiment too
        defining.update({k: v for k, v in own.items() if k.startswith("tpt_")})
    shown = {k: result.get(k, "all" if k == "subsample" else None) for k in SHOWN}
    return {**defining, **shown, "own": result.get("own")}


def _not_defining(result: dict) -> set:
    """Settings that do not define a result's experiment: for the language-model protocol those
    its stage ignores on resume (and the seed), else NOT_DEFINING."""
    if result.get("protocol") != "lm":
        return NOT_DEFINING
    from .lm_config import LMConfig

    return LMConfig.SCHEMA.ignored_on_resume(result["stage"]) | {"seed"}


def _key(exp: dict) -> str:
    return json.dumps(exp, sort_keys=True, default=str)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t interval); the half-width is nan for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t.ppf(0.975, n - 1) * sd / math.sqrt(n)


def aggregate(results: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for r in results:
        groups[_key(experiment(r))].append(r)
    experiments = {k: json.loads(k) for k in groups}
    # Settings that tell apart groups the shown columns do not.
    varying = sorted({name for e in experiments.values() for name in e if name not in SHOWN
                      and len({json.dumps(x.get(name), sort_keys=True) for x in experiments.values()}) > 1})
    rows = []
    for key, runs in sorted(groups.items()):
        files_by_seed = defaultdict(list)
        for r in runs:
            files_by_seed[r.get("seed")].append(r["_file"])
        for seed, files in files_by_seed.items():
            if len(files) > 1:
                raise ValueError(f"report: {' and '.join(files)} are the same experiment with the same seed {seed} "
                                 "(a copied run folder?): keep one of them")
        exp = experiments[key]
        base = {**{k: exp[k] for k in SHOWN}, "runs": len(runs), "seeds": sorted(files_by_seed, key=str),
                "differs": ", ".join(f"{name}={exp.get(name)}" for name in varying)}
        # The own test set first (named as the stages name it), then every other evaluated set.
        own = runs[0].get("own") or (exp["dataset"] if exp["subsample"] == "all"
                                     else f"{exp['dataset']}[{exp['subsample']}]")
        names = sorted({n for r in runs for n in r.get("results", {})} | {own}, key=lambda n: (n != own, n))
        rows += [{**base, "evaluated_on": name, **_metrics(runs, name, own)} for name in names]
    return rows


def _metrics(runs: list[dict], name: str, own: str) -> dict:
    row = {}
    for metric in METRICS:
        source = (lambda r: r) if name == own else (lambda r: r.get("results", {}).get(name, {}))
        scale = 1 if metric in UNSCALED else 100
        values = [scale * source(r)[metric] for r in runs if metric in source(r)]
        if values:
            row[metric], row[f"{metric}_ci95"] = mean_ci(values)
            if metric in ("top1", "loss"):
                row["runs"] = len(values)
    return row


def _cell(row, metric):
    if metric not in row:
        return ""
    ci = row[f"{metric}_ci95"]
    return f"{row[metric]:.2f}" if math.isnan(ci) else f"{row[metric]:.2f} ± {ci:.2f}"


COLUMNS = ("stage", "method", "model", "pretrained", "dataset", "shots", "subsample", "evaluated_on", "runs")


def to_markdown(rows) -> str:
    metrics = [m for m in METRICS if any(m in r for r in rows)]
    extra = ["differs"] if any(r["differs"] for r in rows) else []
    head = ["stage", "method", "model", "pretrained", "trained on", "shots", "classes", "evaluated on", "runs"] + \
        metrics + extra
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = ["-" if r[c] is None else str(r[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells + [_cell(r, m) for m in metrics] + [r[e] for e in extra]) + " |")
    return "\n".join(lines)


def to_csv(rows) -> str:
    metrics = [m for m in METRICS if any(m in r for r in rows)]
    fields = list(COLUMNS) + [f for m in metrics for f in (m, f"{m}_ci95")] + ["differs"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def report(paths, out: str | Path) -> tuple[Path, Path]:
    """Write <out>.md and <out>.csv; print the markdown table."""
    from ..atomic import write_text_atomic

    rows = aggregate(find_results(paths))
    out = Path(out)
    md, csv_path = out.with_suffix(".md"), out.with_suffix(".csv")
    write_text_atomic(md, "Mean ± 95% CI over seeds; accuracies and exact match in %, loss in nats per token\n\n"
                      + to_markdown(rows) + "\n")
    write_text_atomic(csv_path, to_csv(rows))
    print(to_markdown(rows))
    return md, csv_path
