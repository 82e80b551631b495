"""DPL step benchmark runner: python benchmarks/bench_step.py [--help]. Same as `fastdpl bench step`."""
from fastdpl.bench.step import main

if __name__ == "__main__":
    raise SystemExit(main())
