"""Atomic file writes: write a temporary file in the target's folder, then rename it over the target.

A killed process never leaves half a checkpoint, result or figure behind: readers see
the old file or the new one. Every file fastdpl writes goes through ``replace_atomically``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The permissions an ordinary open() would give (mkstemp's temporary files are 0600).
FILE_MODE = 0o666 & ~_umask()


def replace_atomically(path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temporary file next to ``path``; then it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path, text: str) -> Path:
    return replace_atomically(path, lambda tmp: tmp.write_text(text))


def save_atomic(obj, path) -> Path:
    """torch.save, atomically."""
    import torch

    return replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def savefig_atomic(fig, path, **kwargs) -> Path:
    """A matplotlib figure as PNG, atomically."""
    return replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", **kwargs))
