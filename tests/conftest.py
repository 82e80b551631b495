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
# A fresh inductor cache per test session: its on-disk FX-graph cache does not notice
# that a custom op's fake implementation changed, and would replay stale graphs.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastdpl-inductor-"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: compiles with torch.compile or runs large shapes")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from a fixed global seed (inputs use their own generators too)."""
    torch.manual_seed(0)
    yield
