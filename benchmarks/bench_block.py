"""block benchmark runner: python benchmarks/bench_block.py [--help]. Same as `fastdpl bench block`."""
from fastdpl.bench.block import main

if __name__ == "__main__":
    raise SystemExit(main())
