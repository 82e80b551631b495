"""cocoop benchmark runner: python benchmarks/bench_cocoop.py [--help]. Same as `fastdpl bench cocoop`."""
from fastdpl.bench.cocoop import main

if __name__ == "__main__":
    raise SystemExit(main())
