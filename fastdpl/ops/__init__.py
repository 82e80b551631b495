"""Public entry point of the mixture-of-prompt-lengths attention.

``mixture_prefix_attention`` checks its inputs (skipped while torch.compile
traces), picks an engine and runs it:

* ``"reference"`` - the literal per-candidate loop (``reference.py``);
* ``"eager"``     - one concatenated attention in plain PyTorch (``eager.py``);
* ``"triton"``    - the fused kernels behind a registered custom op (``library.py``);
* ``"auto"``      - triton for CUDA tensors when Triton imports, eager otherwise.
"""
from __future__ import annotations

import importlib.util
import math
import numbers
from typing import Sequence

import torch

from .eager import eager_mixture_prefix_attention
from .library import fused_mixture_prefix_attention
from .reference import reference_mixture_prefix_attention

IMPLS = ("auto", "reference", "eager", "triton")
_ENGINES = {
    "reference": reference_mixture_prefix_attention,
    "eager": eager_mixture_prefix_attention,
    "triton": fused_mixture_prefix_attention,
}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["IMPLS", "mixture_prefix_attention", "resolve_impl", "triton_available", "triton_interpreted"]


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


# Looked up once, without importing Triton (and so without touching CUDA).
_TRITON_FOUND = _find_triton()


def triton_available() -> bool:
    """Whether Triton is installed here (its kernels still need CUDA or TRITON_INTERPRET=1)."""
    return _TRITON_FOUND


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET, read by Triton itself).

    The one place fastdpl asks; it imports Triton only when called. Kernels are decorated
    in interpreter mode when first imported, so set the variable before that."""
    if not _TRITON_FOUND:
        return False
    from triton import knobs

    return bool(knobs.runtime.interpret)


def resolve_impl(impl: str, device: torch.device) -> str:
    """The engine that ``impl`` means for tensors on ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_available() else "eager"
    if impl == "triton" and not triton_available():
        raise ImportError("impl='triton' needs Triton (pip install triton); use impl='eager' without it")
    return impl


def normalize_candidate_lengths(candidate_lengths) -> tuple[int, ...]:
    """A tuple of non-negative Python ints, or a TypeError/ValueError naming the argument."""
    if isinstance(candidate_lengths, torch.Tensor):
        if candidate_lengths.dim() != 1 or candidate_lengths.dtype.is_floating_point:
            raise TypeError("candidate_lengths must be a 1-D integer sequence")
        candidate_lengths = candidate_lengths.tolist()
    if isinstance(candidate_lengths, (str, bytes)) or not isinstance(candidate_lengths, Sequence):
        raise TypeError(f"candidate_lengths must be a sequence of ints, got {type(candidate_lengths).__name__}")
    lengths = []
    for n in candidate_lengths:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"candidate_lengths must hold ints, got {n!r}")
        if n < 0:
            raise ValueError(f"candidate_lengths must be non-negative, got {n}")
        lengths.append(int(n))
    if not lengths:
        raise ValueError("candidate_lengths must name at least one candidate")
    return tuple(lengths)


def _check_tensor(name, t, ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_inputs(q, k, v, prompt_k, prompt_v, lengths, weights, causal, scale, key_mask):
    _check_tensor("q", q, 4)
    batch, heads, n_queries, head_dim = q.shape
    if n_queries < 1 or head_dim < 1 or batch < 1 or heads < 1:
        raise ValueError(f"q must have non-empty (B, H, N, D), got {tuple(q.shape)}")
    _check_tensor("k", k, 4)
    kv_heads, n_keys = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != head_dim or kv_heads < 1 or n_keys < 1:
        raise ValueError(f"k must have shape (B, H_kv, N_k, D) with q's B = {batch} and D = {head_dim}, "
                         f"got {tuple(k.shape)}")
    if heads % kv_heads:
        raise ValueError(f"k's {kv_heads} key/value heads must divide q's {heads} query heads "
                         "(grouped-query attention)")
    _check_tensor("v", v, 4)
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape (B, H_kv, N_k, D) = {tuple(k.shape)}, got {tuple(v.shape)}")
    if causal and n_queries > n_keys:
        raise ValueError(f"causal=True needs at most as many queries as keys (the queries are the last N of "
                         f"N_k positions), got q with N = {n_queries} and k with N_k = {n_keys}")
    n_prompt = sum(lengths)
    for name, t in (("prompt_k", prompt_k), ("prompt_v", prompt_v)):
        _check_tensor(name, t, 3)
        expected = (kv_heads, n_prompt, head_dim)
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must have shape (H_kv, sum(candidate_lengths), D) = {expected}, got {tuple(t.shape)}"
            )
    _check_tensor("weights", weights, 1)
    if weights.shape[0] != len(lengths):
        raise ValueError(
            f"weights must have one entry per candidate ({len(lengths)}), got shape {tuple(weights.shape)}"
        )
    for name, t in (("k", k), ("v", v), ("prompt_k", prompt_k), ("prompt_v", prompt_v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    for name, t in (("k", k), ("v", v), ("prompt_k", prompt_k), ("prompt_v", prompt_v), ("weights", weights)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if key_mask is not None:
        _check_key_mask(key_mask, batch, n_keys, q.device)
    if scale is not None:
        _check_scale(scale)


def _check_key_mask(key_mask, batch, n_keys, device):
    if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
        kind = key_mask.dtype if isinstance(key_mask, torch.Tensor) else type(key_mask).__name__
        raise TypeError(f"key_mask must be a bool tensor (True = a real key), got {kind}")
    if tuple(key_mask.shape) != (batch, n_keys):
        raise ValueError(f"key_mask must have shape (B, N_k) = {(batch, n_keys)}, got {tuple(key_mask.shape)}")
    if key_mask.device != device:
        raise ValueError(f"key_mask must be on q's device {device}, got {key_mask.device}")


def _check_scale(scale):
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number (the factor on q.k), got {scale!r}")


def mixture_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_k: torch.Tensor,
    prompt_v: torch.Tensor,
    candidate_lengths: Sequence[int],
    weights: torch.Tensor,
    causal: bool = False,
    impl: str = "auto",
    *,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted mixture over candidate prompt lengths of prefix-prompted attention.

    Args:
        q: (B, H, N, D) queries of the original tokens: the last N of the N_k positions.
        k, v: (B, H_kv, N_k, D) keys and values of the original tokens, H_kv dividing H:
            query head h reads key/value head h // (H / H_kv) (grouped-query attention,
            transformers' ``repeat_kv`` order; nothing is expanded in memory).
        prompt_k, prompt_v: (H_kv, P, D) prompt keys/values of all candidates,
            concatenated in candidate order (P = sum(candidate_lengths)); shared by
            every sequence of the batch, never expanded over B or the query heads.
        candidate_lengths: non-negative ints, the prompt length of each candidate.
        weights: (C,) mixture weights, usually softmax(arch_logits); differentiable.
        causal: query i sees original key j iff j <= i + N_k - N (with N = N_k the usual
            mask; N < N_k: queries after a cache of N_k - N keys). Prompt keys are always visible.
        impl: "auto", "reference", "eager" or "triton".
        scale: the factor on q.k (default D^-0.5).
        key_mask: optional (B, N_k) bool, True where a key is a real token (padded batches,
            left or right); masked keys are invisible to every query.

    Returns:
        (B, H, N, D): ``sum_c weights[c] * softmax(scale q [k; pk_c]^T + mask) [v; pv_c]``, where
        a candidate with no visible key in a row (a zero-length candidate whose row sees no
        original key) contributes zeros to that row, never NaN.
        Gradients flow to q, k, v, prompt_k, prompt_v (summed over the batch and the query
        heads that share them) and weights.
    """
    lengths = normalize_candidate_lengths(candidate_lengths)
    if not torch.compiler.is_compiling():
        _check_inputs(q, k, v, prompt_k, prompt_v, lengths, weights, causal, scale, key_mask)
    engine = _ENGINES[resolve_impl(impl, q.device)]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return engine(q, k, v, prompt_k, prompt_v, lengths, weights, causal=bool(causal), scale=scale, key_mask=key_mask)
