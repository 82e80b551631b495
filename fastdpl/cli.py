"""The `fastdpl` command line.

    fastdpl bench [op] [options]     benchmark the fused op against its peers
    fastdpl bench step [options]     benchmark one DPL step: search vs single path vs literal supernet
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fastdpl", description="Fast Differentiable Prompt Learning for CLIP")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks (fastdpl bench op --help, fastdpl bench step --help)",
                           add_help=False)
    bench.add_argument("suite", nargs="?", default="op", choices=["op", "step"])
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        import importlib

        return importlib.import_module(f"fastdpl.bench.{args.suite}").main(rest)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
