"""What every `fastdpl bench` runner shares: shape sets per device, the run loop, the command line,
and the outputs (JSON with provenance, a markdown summary, a PNG bar chart of the ratios)."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..atomic import savefig_atomic, write_text_atomic
from .timing import (
    add_common_arguments, environment, parse_shapes, peak_memory_mb, summarize, time_interleaved, write_result,
)


@dataclass(frozen=True)
class Suite:
    name: str
    gpu_shapes: list
    cpu_shapes: list
    smoke_shapes: list
    bench_shape: Callable  # (shape, device, dtype, impl, repeats, warmup) -> rows
    format_table: Callable  # rows -> str
    describe: Callable  # shape -> one line
    ratio_key: str  # the row field charted in the PNG
    ratio_label: str
    repeats: tuple = (20, 5, 2)  # GPU, CPU, smoke
    gpu_dtype: torch.dtype = torch.float32
    warmup: int = 1  # untimed calls per provider before timing (1 in smoke runs)

    @property
    def all_shapes(self) -> list:
        return self.gpu_shapes + self.cpu_shapes + self.smoke_shapes


def table(rows: list, labels: list, columns: list) -> str:
    """A fixed-width text table. ``labels``: [(row key, width)] left-aligned (shape, provider, ...);
    ``columns``: [(header, row key, format spec)] right-aligned; "IQR" shows q1-q3; missing values "-"."""
    def cell(r, key, spec):
        if key == "iqr":
            return f"{r['q1_ms']:{spec}}-{r['q3_ms']:{spec}}"
        return "-" if r.get(key) is None else format(r[key], spec)

    width = [max(len(h), 9 if key != "iqr" else 17) for h, key, _ in columns]
    header = " ".join(f"{name:<{w}}" for name, w in labels) + " " + \
        " ".join(f"{h:>{w}}" for (h, _, _), w in zip(columns, width))
    lines = [header, "-" * len(header)]
    for r in rows:
        head = " ".join(f"{str(r.get(name, '')):<{w}}" for name, w in labels)
        if "error" in r:
            lines.append(f"{head} unavailable: {r['error']}")
        else:
            lines.append(head + " " + " ".join(f"{cell(r, key, spec):>{w}}"
                                               for (_, key, spec), w in zip(columns, width)))
    return "\n".join(lines)


def time_calls(shape_name: str, calls: dict, device, repeats: int, warmup: int, per_call: dict | None = None) -> list:
    """Rows for ``calls`` {provider: call(i)} timed interleaved; a provider whose first call fails
    (say, out of memory) gets an error row instead. ``per_call`` {provider: n}: times divided by n."""
    rows, ok, first = [], {}, {}
    for name, call in calls.items():
        try:
            began = time.perf_counter()
            call(0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first[name] = time.perf_counter() - began  # with any compile (torch.compile, Triton's JIT)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for a literal baseline
            rows.append(dict(shape=shape_name, provider=name, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        ok[name] = call
    for name, times in time_interleaved(ok, device, repeats, warmup).items():
        n = (per_call or {}).get(name, 1)
        rows.append(dict(shape=shape_name, provider=name, **summarize([t / n for t in times]),
                         peak_memory_mb=peak_memory_mb(lambda: ok[name](0), device), first_call_s=first[name]))
    return rows


def add_ratios(rows: list, baseline: str, key: str, invert: bool = False, only: Callable = lambda name: True) -> None:
    """row[key] = time / baseline's time (invert: baseline's time / time), per shape; None without it.
    ``only(provider)`` limits which rows get the ratio."""
    base = {r["shape"]: r["median_ms"] for r in rows if r.get("provider") == baseline and "median_ms" in r}
    for r in rows:
        if "median_ms" in r and only(r["provider"]):
            b = base.get(r["shape"])
            r[key] = None if b is None else (b / r["median_ms"] if invert else r["median_ms"] / b)


def run_suite(suite: Suite, device=None, dtype=None, shapes=None, impl="auto", repeats=None, warmup=None, out=None,
              smoke=False, echo=print) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype = dtype or (suite.gpu_dtype if gpu else torch.float32)
    if shapes is None:
        shapes = suite.smoke_shapes if smoke else (suite.gpu_shapes if gpu else suite.cpu_shapes)
    repeats = repeats or suite.repeats[2 if smoke else (0 if gpu else 1)]
    warmup = warmup if warmup is not None else (1 if smoke else suite.warmup)
    result = {"benchmark": suite.name, "environment": environment(device), "dtype": str(dtype).replace("torch.", ""),
              "impl": impl, "repeats": repeats, "shapes": [asdict(s) for s in shapes], "rows": []}
    for shape in shapes:
        echo(f"# {shape.name}: {suite.describe(shape)}")
        result["rows"] += suite.bench_shape(shape, device, dtype, impl, repeats, warmup)
    table = suite.format_table(result["rows"])
    echo(table)
    if out is not None:
        echo(f"wrote {write_outputs(suite, result, out, table)}")
    return result


def _command() -> str:
    runner = Path(sys.argv[0]).name
    return " ".join(["fastdpl", *sys.argv[1:]]) if runner in ("fastdpl", "cli.py") else " ".join(sys.argv)


def write_outputs(suite: Suite, result: dict, out, table: str, command: str | None = None) -> Path:
    """<out>.json, <out>.md (command, environment, table) and <out>.png (the ratios)."""
    out = write_result(result, out)
    env = result["environment"]
    command = command or _command()
    summary = [f"# `{suite.name}` benchmark: {env.get('device')} ({env.get('timestamp', '')[:10]})", "",
               f"Command: `{command}`", "",
               f"dtype {result['dtype']}, impl {result['impl']}, "
               f"{result['repeats']} interleaved repeats (median, IQR); "
               f"torch {env.get('torch')}, triton {env.get('triton')}, open_clip {env.get('open_clip_torch')}, "
               f"commit {env.get('commit')}.", "", "```", table, "```", "",
               f"Chart: `{out.with_suffix('.png').name}` ({suite.ratio_label}).", ""]
    write_text_atomic(out.with_suffix(".md"), "\n".join(summary))
    ratio_chart(result["rows"], suite.ratio_key, suite.ratio_label, out.with_suffix(".png"))
    return out


def ratio_chart(rows, key: str, label: str, path: Path) -> Path | None:
    """Horizontal bars of row[key] per (shape, provider); a line at 1.0."""
    bars = [(" / ".join(str(r[k]) for k in ("shape", "mode", "provider") if k in r), r[key])
            for r in rows if r.get(key) is not None]
    if not bars:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.35 * len(bars) + 1.2))
    ax.barh([b[0] for b in bars][::-1], [b[1] for b in bars][::-1], color="tab:blue")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel(label)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=110)
    plt.close(fig)
    return path


def suite_main(suite: Suite, argv=None, description: str = "") -> int:
    parser = argparse.ArgumentParser(prog=f"fastdpl bench {suite.name}", description=description)
    add_common_arguments(parser, default_out=f"bench-out/{suite.name}.json")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help=f"default: {str(suite.gpu_dtype).replace('torch.', '')} on CUDA, float32 on CPU")
    parser.add_argument("--impl", default="auto", choices=["auto", "eager", "triton", "reference"])
    args = parser.parse_args(argv)
    shapes = parse_shapes(parser, args, suite.all_shapes)
    run_suite(suite, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None, shapes=shapes,
              impl=args.impl, repeats=args.repeats, out=args.out, smoke=args.smoke)
    return 0


# ---- what the model-step suites (lm, vit) share: search vs single path vs literal ---------------------
STEP_COLUMNS = [("ms/step", "median_ms", ".1f"), ("IQR ms", "iqr", ".1f"), ("peak MB", "peak_memory_mb", ".0f"),
                ("x single", "vs_single_path", ".2f"), ("mem x single", "memory_vs_single_path", ".2f"),
                ("literal/this", "literal_over_this", ".2f"), ("lit mem/this", "literal_memory_over_this", ".2f")]
# a compiled provider against the eager one (vs_search), and every provider's first call (compiles included)
COMPILED_COLUMNS = [("x search", "vs_search", ".2f"), ("first s", "first_call_s", ".2f")]


def memory_ratio(rows, baseline: str, key: str, invert: bool = False) -> None:
    """row[key] = peak memory / the baseline's (invert: baseline's / this), per shape; None on a CPU."""
    base = {r["shape"]: r.get("peak_memory_mb") for r in rows if r["provider"] == baseline}
    for r in rows:
        mine, theirs = r.get("peak_memory_mb"), base.get(r["shape"])
        r[key] = (theirs / mine if invert else mine / theirs) if mine and theirs else None


def step_ratios(rows) -> None:
    """Time and memory against the single path (``vs_single_path``) and of the literal over each."""
    add_ratios(rows, "single_path", "vs_single_path")
    add_ratios(rows, "literal", "literal_over_this", invert=True)
    memory_ratio(rows, "single_path", "memory_vs_single_path")
    memory_ratio(rows, "literal", "literal_memory_over_this", invert=True)


def release(device) -> None:
    """Free what the last shape's models held before the next shape builds its own."""
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def add_step_arguments(parser, providers: tuple) -> None:
    """The model-step runners' options beside add_common_arguments'."""
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--impl", default="auto", choices=["auto", "eager", "triton", "reference"],
                        help="the search's op engine")
    parser.add_argument("--providers", default=",".join(providers), help=f"comma-separated subset of {providers}")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per provider (default 1)")


def provider_names(parser, text: str, known: tuple) -> tuple:
    """--providers as a tuple of known names; a parser error naming the unknown ones."""
    names = tuple(n for n in text.split(",") if n)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"--providers: unknown {unknown or names}; known: {list(known)}")
    return names


def run_step_suite(suite: Suite, parser, args, **bench_options) -> None:
    """Run a model-step suite from its parsed command line (add_common_arguments + add_step_arguments)."""
    import dataclasses
    import functools

    shapes = parse_shapes(parser, args, suite.all_shapes)
    bench = functools.partial(suite.bench_shape, **bench_options)
    run_suite(dataclasses.replace(suite, bench_shape=bench), device=args.device, shapes=shapes, impl=args.impl,
              dtype=getattr(torch, args.dtype) if args.dtype else None, repeats=args.repeats, warmup=args.warmup,
              out=args.out, smoke=args.smoke)
