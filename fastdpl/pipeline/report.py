"""Aggregate many runs' results.json into mean +- 95% confidence-interval tables (markdown and CSV).

Runs are grouped by (stage, method, dataset, shots, subsample); the seeds of a
group are the samples. The interval is mean +- t_{0.975, n-1} * s / sqrt(n)
(Student's t; no interval for a single run).
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path

METRICS = ("top1", "base", "new", "hm")


def find_results(paths) -> list[dict]:
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"report: no such file or folder {path}")
        files = [path] if path.is_file() else sorted(path.rglob("results.json"))
        for file in files:
            try:
                found.append({**json.loads(file.read_text()), "_file": str(file)})
            except json.JSONDecodeError as exc:
                raise ValueError(f"report: {file} is not valid JSON: {exc}") from exc
    if not found:
        raise FileNotFoundError(f"report: no results.json under {', '.join(map(str, paths))}")
    return found


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
        groups[(r["stage"], r["method"], r["dataset"], r.get("shots"), r.get("subsample", "all"))].append(r)
    rows = []
    for (stage, method, dataset, shots, subsample), runs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        row = {"stage": stage, "method": method, "dataset": dataset, "shots": shots, "subsample": subsample,
               "runs": len(runs), "seeds": sorted({r.get("seed") for r in runs})}
        for metric in METRICS:
            values = [100 * r[metric] for r in runs if metric in r]
            if values:
                row[metric], row[f"{metric}_ci95"] = mean_ci(values)
        rows.append(row)
    return rows


def _cell(row, metric):
    if metric not in row:
        return ""
    ci = row[f"{metric}_ci95"]
    return f"{row[metric]:.2f}" if math.isnan(ci) else f"{row[metric]:.2f} ± {ci:.2f}"


def to_markdown(rows) -> str:
    metrics = [m for m in METRICS if any(m in r for r in rows)]
    head = ["stage", "method", "dataset", "shots", "runs"] + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["stage"], r["method"], r["dataset"], str(r["shots"]), str(r["runs"])]
        lines.append("| " + " | ".join(cells + [_cell(r, m) for m in metrics]) + " |")
    return "\n".join(lines)


def to_csv(rows) -> str:
    metrics = [m for m in METRICS if any(m in r for r in rows)]
    fields = ["stage", "method", "dataset", "shots", "subsample", "runs"] + \
        [f for m in metrics for f in (m, f"{m}_ci95")]
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
    write_text_atomic(md, "Accuracy (%), mean ± 95% CI over seeds\n\n" + to_markdown(rows) + "\n")
    write_text_atomic(csv_path, to_csv(rows))
    print(to_markdown(rows))
    return md, csv_path
