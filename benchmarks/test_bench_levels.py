"""pytest-benchmark view of the block, step, TPT and CoCoOp levels (same shapes and providers as
`fastdpl bench block|step|tpt|cocoop`; the op level is in test_bench_op.py).

    pytest benchmarks/ --benchmark-json bench-out/levels-pytest.json

extra_info carries the device, versions, level, shape and dtype. FASTDPL_BENCH_SMOKE=1: tiny shapes.
Input sets rotate between calls; the fast_group4 TPT provider tunes 4 images per call.
"""
import itertools
import os

import pytest
import torch

from fastdpl.bench import block, cocoop, step, tpt
from fastdpl.bench.timing import environment

SMOKE = os.environ.get("FASTDPL_BENCH_SMOKE") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LEVELS = {"block": (block, ["search", "single_path", "literal", "plain"]),
          "step": (step, ["search", "single_path", "literal", "train", "train_literal"]),
          "tpt": (tpt, ["fast", "fast_group4", "literal"]),
          "cocoop": (cocoop, ["fast", "fast_chunked", "literal"])}


def _cases():
    for level, (module, names) in LEVELS.items():
        suite = module.SUITE
        shapes = suite.smoke_shapes if SMOKE else (suite.gpu_shapes if DEVICE.type == "cuda" else suite.cpu_shapes)
        for shape, name in itertools.product(shapes, names):
            if level == "step" and name not in step.provider_names(shape):
                continue  # the literal providers exist for open_clip models only
            yield pytest.param(level, shape, name, id=f"{level}-{shape.name}-{name}")


_CALLS = {}


@pytest.mark.parametrize("level,shape,provider", list(_cases()))
def test_level(benchmark, level, shape, provider):
    module, _ = LEVELS[level]
    dtype = module.SUITE.gpu_dtype if DEVICE.type == "cuda" else torch.float32
    key = (level, shape)
    if key not in _CALLS:  # build a model once per level and shape
        _CALLS.clear()
        _CALLS[key] = module.make_calls(shape, DEVICE, dtype, "auto")
    call = _CALLS[key][provider]
    counter = itertools.count()

    def run():
        result = call(next(counter))
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return result

    benchmark.extra_info.update(environment(DEVICE))
    benchmark.extra_info.update(level=level, shape=shape.name, dtype=str(dtype))
    benchmark(run)
