"""Every benchmark suite at smoke sizes on the CPU, in one process (``gpu_check.sh --smoke``, in CI).

    python -m fastdpl.bench.smoke OUT_DIR PREFIX LEVEL [LEVEL ...]

writes exactly what ``fastdpl bench LEVEL --device cpu --smoke --out OUT_DIR/PREFIX-LEVEL.json``
writes for each level (the JSON with provenance, the markdown summary, the chart), through the same
runners, without a Python start and a torch import per suite (half of a smoke run's time). A suite
that fails is reported with its traceback and the others still run; the exit status is 1 if any
failed. The GPU run (and its rehearsal) calls each suite's own command line instead.
"""
from __future__ import annotations

import importlib
import sys
import time
import traceback

LEVELS = ("op", "block", "step", "tpt", "cocoop", "lm", "vit")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or any(level not in LEVELS for level in argv[2:]):
        print(f"usage: python -m fastdpl.bench.smoke OUT_DIR PREFIX LEVEL [LEVEL ...] (levels: {', '.join(LEVELS)})",
              file=sys.stderr)
        return 2
    out, prefix, levels = argv[0], argv[1], argv[2:]
    status = 0
    for level in levels:
        started = time.perf_counter()
        print(f"[smoke] {level}: start", flush=True)
        try:
            code = importlib.import_module(f"fastdpl.bench.{level}").main(
                ["--device", "cpu", "--smoke", "--out", f"{out}/{prefix}-{level}.json"])
        except Exception:  # noqa: BLE001 - reported, and the other suites still run
            traceback.print_exc()
            code = 1
        print(f"[smoke] {level}: exit {code} after {time.perf_counter() - started:.0f}s", flush=True)
        status = status or int(code != 0)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
