"""tpt benchmark runner: python benchmarks/bench_tpt.py [--help]. Same as `fastdpl bench tpt`."""
from fastdpl.bench.tpt import main

if __name__ == "__main__":
    raise SystemExit(main())
