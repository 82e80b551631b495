"""Timing and provenance shared by every fastdpl benchmark.

Timing rules (see docs in benchmarks/README.md): warm-up calls first; on CUDA
each call is timed with a pair of CUDA events, on the CPU with perf_counter;
providers are timed round-robin ("interleaved") so that drift of the machine
hits all of them alike; several input sets rotate so caches don't flatter; the
summary is the median with the interquartile range. A measured time of zero is
an error, never a data point.
"""
from __future__ import annotations

import datetime
import json
import importlib.metadata
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from ..atomic import write_text_atomic


def _version(package: str):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict:
    """Device, versions, commit and time: recorded with every benchmark result."""
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return {
        "device": device_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "triton": _version("triton"),
        "open_clip_torch": _version("open_clip_torch"),
        "xformers": _version("xformers"),
        "fastdpl": _version("fastdpl"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _time_once_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        elapsed = start.elapsed_time(end)
    else:
        begin = time.perf_counter()
        fn()
        elapsed = (time.perf_counter() - begin) * 1e3
    if elapsed <= 0.0:
        raise RuntimeError("a timed call measured 0 ms: the timer cannot resolve it; use a larger shape")
    return elapsed


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak allocated memory of one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def summarize(samples_ms: list[float]) -> dict:
    # "inclusive": quartiles stay within [min, max] (the default extrapolates beyond them for few samples)
    quartiles = (statistics.quantiles(samples_ms, n=4, method="inclusive") if len(samples_ms) > 1
                 else [samples_ms[0]] * 3)
    return {
        "median_ms": statistics.median(samples_ms),
        "q1_ms": quartiles[0],
        "q3_ms": quartiles[2],
        "min_ms": min(samples_ms),
        "repeats": len(samples_ms),
    }


def time_interleaved(calls: dict[str, Callable[[int], object]], device: torch.device, repeats: int,
                     warmup: int = 2) -> dict[str, list[float]]:
    """Time each named call ``repeats`` times, round-robin. ``call(i)`` runs on input set i."""
    for name, call in calls.items():
        for i in range(warmup):
            call(i)
    samples = {name: [] for name in calls}
    for r in range(repeats):
        for name, call in calls.items():
            samples[name].append(_time_once_ms(lambda: call(r), device))
    return samples


def write_result(result: dict, out) -> Path:
    """Write a result JSON atomically (temporary file, then rename): never half a file."""
    return write_text_atomic(out, json.dumps(result, indent=1))


def add_common_arguments(parser, default_out: str) -> None:
    """The options every benchmark runner shares."""
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated shape names (default: the device's set); see --list")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per provider")
    parser.add_argument("--out", default=default_out, help="JSON results path")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, two repeats: checks the runner works")
    parser.add_argument("--list", action="store_true", help="list the shape names and exit")


def parse_shapes(parser, args, shapes: list):
    """Shapes named by --shapes (None: the runner's default); prints them and exits for --list."""
    known = {s.name: s for s in shapes}
    if args.list:
        print("\n".join(f"{name}: {s}" for name, s in known.items()))
        raise SystemExit(0)
    if not args.shapes:
        return None
    unknown = [name for name in args.shapes.split(",") if name not in known]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; known: {sorted(known)}")
    return [known[name] for name in args.shapes.split(",")]
