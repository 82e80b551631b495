"""Op benchmark runner: python benchmarks/bench_op.py [--help]. Same as `fastdpl bench op`."""
from fastdpl.bench.op import main

if __name__ == "__main__":
    raise SystemExit(main())
