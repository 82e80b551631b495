"""NVTX ranges for Nsight, named like ``fastdpl/text/block0/attn``.

Off by default; on with ``enable_nvtx()`` or the environment variable
``FASTDPL_NVTX=1``. When off, ``nvtx_range`` returns one shared no-op context
manager: no call into NVTX, no allocation. While torch.compile traces, ranges
are skipped (they would break the graph).
"""
from __future__ import annotations

import contextlib
import os

import torch

_enabled = os.environ.get("FASTDPL_NVTX", "0") == "1"
_NULL = contextlib.nullcontext()


def enable_nvtx(enabled: bool = True) -> None:
    global _enabled
    _enabled = bool(enabled)


def nvtx_enabled() -> bool:
    return _enabled


def _push(name: str) -> None:
    import nvtx

    nvtx.push_range(name)


def _pop() -> None:
    import nvtx

    nvtx.pop_range()


class _Range:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        _push(self.name)
        return self

    def __exit__(self, *exc):
        _pop()
        return False


def nvtx_range(name: str):
    """Context manager around a region; a shared no-op unless NVTX is enabled."""
    if not _enabled or torch.compiler.is_compiling():
        return _NULL
    return _Range(name)
