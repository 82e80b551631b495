"""Benchmarks of fastdpl that ship with the package (run by `fastdpl bench`)."""
