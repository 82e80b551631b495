"""The GPU targets of fastdpl, checked against the benchmark JSONs of one run.

``python -m fastdpl.bench.targets OUT_DIR`` reads ``OUT_DIR/*-{op,step,tpt,lm}.json`` (or
``op.json`` ...), as ``benchmarks/gpu_check.sh`` writes them, and writes
``OUT_DIR/*-targets.json`` and ``.md``: each target, the measured ratio (all ratios
are of providers timed side by side in one run), and whether it is met. bf16:

* op forward+backward at most 1.3x the fastest SDPA backend over N + sum(lengths)
  keys, on the image shape and the 1000-sequence text shapes; at most 1.15x one SDPA
  over N + max(lengths) keys (a single prefix, as prefix tuning runs) on the
  language-model layer shapes;
* search step at most 1.2x the single-path step, peak memory at most 1.2x; at least
  4x faster than the literal supernet at 100 classes and 8x at 1000;
* TPT at least 5x the literal per-image implementation at 1000 classes;
* language-model search step (Llama-3.2-1B shape, B=4, N=512 and 2048) at most 1.1x the
  single-path step (PEFT prefix tuning at the longest candidate), peak memory at most 1.1x.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..atomic import write_text_atomic

OP_SHAPES = ("image-b128", "text-1000cls-n20", "text-1000cls-n77")
LM_OP_SHAPES = ("lm-1b-n512", "lm-1b-n2048")  # fastdpl.bench.op.LM_TARGET_SHAPES (not imported: no torch here)
LM_STEP_SHAPES = ("llama-1b-n512", "llama-1b-n2048")  # fastdpl.bench.lm.GPU_SHAPES' names


def _rows(result: dict | None, **match) -> list:
    if not result:
        return []
    return [r for r in result["rows"] if all(r.get(k) == v for k, v in match.items())]


def _target(name, value, limit, at_most=True):
    met = None if value is None else (value <= limit if at_most else value >= limit)
    return {"target": name, "value": value, "limit": limit, "at_most": at_most, "met": met}


def check(op: dict | None, step: dict | None, tpt: dict | None, lm: dict | None = None) -> list[dict]:
    targets = []
    for shape in OP_SHAPES:
        row = next(iter(_rows(op, shape=shape, mode="fwd+bwd", provider="triton")), {})
        targets.append(_target(f"op fwd+bwd {shape}: time / fastest SDPA over N+sum keys", row.get("vs_sdpa_sum"), 1.3))
    for shape in LM_OP_SHAPES:
        row = next(iter(_rows(op, shape=shape, mode="fwd+bwd", provider="triton")), {})
        targets.append(_target(f"op fwd+bwd {shape}: time / SDPA over N+max keys", row.get("vs_single_path"), 1.15))
    for row in _rows(step, provider="search"):
        classes = next((s["classes"] for s in step["shapes"] if s["name"] == row["shape"]), None)
        if classes not in (100, 1000) or row["shape"].startswith("hf-"):  # stated for open_clip at 100, 1000 classes
            continue
        targets.append(_target(f"step {row['shape']}: search / single path", row.get("vs_single_path"), 1.2))
        targets.append(_target(f"step {row['shape']}: peak memory search / single path",
                               row.get("memory_vs_single_path"), 1.2))
        targets.append(_target(f"step {row['shape']}: literal supernet / search", row.get("literal_over_this"),
                               4.0 if classes == 100 else 8.0, at_most=False))
    for row in _rows(tpt, provider="fast"):
        classes = next((s["classes"] for s in tpt["shapes"] if s["name"] == row["shape"]), None)
        if classes == 1000:
            targets.append(_target(f"tpt {row['shape']}: literal / fast", row.get("literal_over_this"), 5.0,
                                   at_most=False))
    for shape in LM_STEP_SHAPES:  # listed unmeasured too, as the op's LM shapes
        row = next(iter(_rows(lm, shape=shape, provider="search")), {})
        targets.append(_target(f"lm step {shape}: search / single path", row.get("vs_single_path"), 1.1))
        targets.append(_target(f"lm step {shape}: peak memory search / single path",
                               row.get("memory_vs_single_path"), 1.1))
    return targets


def _load(out: Path, level: str) -> dict | None:
    # by the suite's own name: "*lm.json" also matches an op run's "...-op-lm.json"
    found = [r for r in (json.loads(p.read_text()) for p in sorted(out.glob(f"*{level}.json")))
             if r.get("benchmark") == level]
    return found[-1] if found else None


def summarize(out: Path, prefix: str = "") -> dict:
    results = {level: _load(out, level) for level in ("op", "step", "tpt", "lm")}
    environment = next((r["environment"] for r in results.values() if r), {})
    summary = {"environment": environment, "dtypes": {k: r["dtype"] for k, r in results.items() if r},
               "targets": check(results["op"], results["step"], results["tpt"], results["lm"])}
    lines = [f"# GPU targets: {environment.get('device', '?')} ({environment.get('timestamp', '')[:10]})", "",
             f"torch {environment.get('torch')}, triton {environment.get('triton')}, commit "
             f"{environment.get('commit')}; every ratio is of providers timed side by side in one run.", "",
             "| target | measured | limit | met |", "|---|---:|---:|---|"]
    for t in summary["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {value} | {'<=' if t['at_most'] else '>='} {t['limit']} | {met} |")
    path = out / f"{prefix}targets.json"
    write_text_atomic(path, json.dumps(summary, indent=1))
    write_text_atomic(path.with_suffix(".md"), "\n".join(lines) + "\n")
    return summary


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not Path(argv[0]).is_dir():
        print("usage: python -m fastdpl.bench.targets OUT_DIR [PREFIX]: OUT_DIR must hold the benchmark JSONs",
              file=sys.stderr)
        return 2
    summary = summarize(Path(argv[0]), argv[1] if len(argv) > 1 else "")
    for t in summary["targets"]:
        print(f"{'ok ' if t['met'] else '-- ' if t['met'] is None else 'MISS'} {t['target']}: {t['value']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
