"""Triton's interpreter (``TRITON_INTERPRET=1``: the kernels run on a CPU, on NumPy arrays), as
the kernels need it: whether it is on, and one compatibility fix for older Tritons.

Triton 3.6's interpreter turns a scalar kernel argument used as a loop bound (``for p0 in
range(0, P, BLOCK_P)``) into an int with ``int(handle.data)`` on a one-element array, which NumPy
2.5 refuses ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.8 squeezes
the array first. ``fix_loop_bounds`` makes an older interpreter do the same (the interpreter
only: compiled kernels never run this code), so the kernels' interpreted tests run on the GPU
machine's stack (triton 3.6, NumPy 2.5) as they do on newer ones.
"""
from __future__ import annotations

import inspect

import numpy as np
from triton import knobs


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET, read by Triton itself)."""
    return bool(knobs.runtime.interpret)


def _needs_fix(patch_tensor) -> bool:
    """NumPy refuses int() of a one-element array, and this interpreter's __index__ does not squeeze."""
    try:
        int(np.ones(1))
        return False
    except TypeError:
        pass
    source = inspect.getsource(patch_tensor)
    return '"__index__", lambda self: int(self.handle.data))' in source


def fix_loop_bounds() -> bool:
    """Make the interpreter's tensor.__index__ squeeze its one-element array first (Triton 3.8's
    own form); True when the fix was needed and applied. Idempotent."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "fastdpl_fixed", False) or not _needs_fix(original):
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))  # restored LIFO

    patch_lang_tensor.fastdpl_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
