"""Shared pytest setup.

Without a GPU the Triton kernels run in Triton's interpreter: TRITON_INTERPRET
must be set before the kernels are first imported, so it is set here, before any
test module imports fastdpl's kernels. On a CUDA machine the kernels run
compiled unless the caller sets TRITON_INTERPRET=1 explicitly.
"""
import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (the README's `-n auto`) each worker gets its share of the cores: torch's
# default of every core per process would oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
# A fresh inductor cache per test session: its on-disk FX-graph cache does not notice
# that a custom op's fake implementation changed, and would replay stale graphs.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastdpl-inductor-"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: compiles with torch.compile or runs large shapes")


# The longest files first (about 60-120 s each on 2 cores), so that pytest-xdist's workers
# (`--dist loadfile`: a file stays on one worker) do not end on one of them alone.
LONGEST_FIRST = ("test_compiled_kernels.py", "test_gpu_check.py", "test_mixture_attention.py", "test_demo.py",
                 "test_pipeline.py", "test_op_api.py", "test_op_language_models.py", "test_methods.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: order within a file kept


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from a fixed global seed (inputs use their own generators too)."""
    torch.manual_seed(0)
    yield
