"""pytest-benchmark view of the op benchmark (same shapes and providers as `fastdpl bench op`).

    pytest benchmarks/ --benchmark-json bench-out/op-pytest.json

Each benchmark's extra_info carries the device, dtype, versions, shape and FLOPs.
Set FASTDPL_BENCH_SMOKE=1 for tiny shapes (CI runs that, to keep it working).
"""
import os

import pytest
import torch

from fastdpl.bench import op
from fastdpl.bench.timing import environment

SMOKE = os.environ.get("FASTDPL_BENCH_SMOKE") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPES = op.SMOKE_SHAPES if SMOKE else (op.GPU_SHAPES if DEVICE.type == "cuda" else op.CPU_SHAPES)
PROVIDERS = ["reference", "eager", "triton", "lse_merge_math", "lse_merge_xformers", "lse_merge_flex",
             "sdpa_n+max", "sdpa_n+sum", "sdpa_n+max_gqa"]  # the last: grouped-query shapes only


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_op(benchmark, shape, provider, mode):
    available = op.providers(DEVICE, shape)
    if provider not in available:
        pytest.skip(f"{provider} does not run on {DEVICE.type} here")
    fn = available[provider]
    sets = op.make_input_sets(shape, DTYPE, DEVICE, count=3)
    backward = mode == "fwd+bwd"
    counter = iter(range(10**9))

    def call():
        result = op._call(fn, sets[next(counter) % len(sets)], shape, backward)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return result

    benchmark.extra_info.update(environment(DEVICE))
    benchmark.extra_info.update(shape=shape.name, kv_heads=shape.kv_heads, dtype=str(DTYPE), mode=mode,
                                flops=shape.forward_flops() * (3.5 if backward else 1.0))
    benchmark(call)
