"""Triton kernels of fastdpl (fused forward and backward of the mixture attention).

Imported lazily by ``fastdpl.ops`` only when the Triton engine runs, so that
fastdpl imports and its eager engine runs where Triton is missing.
"""
try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by the no-triton subprocess test
    raise ImportError(
        "fastdpl.kernels needs Triton (pip install triton); use impl='eager' to run without it"
    ) from exc

from .mixture_attention import mixture_attention_backward, mixture_attention_forward, set_fp32_precision

__all__ = ["mixture_attention_forward", "mixture_attention_backward", "set_fp32_precision"]
