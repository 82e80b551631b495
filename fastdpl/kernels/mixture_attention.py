"""Host-side launchers of the fused mixture-of-prompt-lengths kernels.

``mixture_attention_forward`` returns ``(out, row_max, denominators)`` and
``mixture_attention_backward`` turns them plus ``grad_out`` into the six
gradients. Shapes: q, k, v (B, H, N, D); prompt_k, prompt_v (H, P, D);
weights (C,); row_max (B, H, N) float32 in log2 units; denominators
(B, H, N, C) float32. Inputs are assumed validated by ``fastdpl.ops``.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton

from .backward import kv_bwd_kernel, prompt_bwd_kernel, q_bwd_kernel
from .forward import mixture_attention_fwd_kernel

LOG2E = 1.4426950408889634
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
# Kernels were decorated in interpreter mode iff TRITON_INTERPRET=1 at import.
INTERPRETED = bool(getattr(getattr(triton, "knobs", None), "runtime", None) and triton.knobs.runtime.interpret)
# Programs sharing one head in the prompt backward; depends on shapes only, so the
# order of the partial-sum reduction (and thus every bit) is fixed.
MAX_PROMPT_SPLITS = 32


def _pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(int(x), 1)))


def _block_sizes(n_queries, head_dim, n_prompt, n_candidates):
    return dict(
        BLOCK_M=64,
        BLOCK_N=64,
        BLOCK_P=min(64, _pow2_at_least(n_prompt)),
        BLOCK_C=_pow2_at_least(n_candidates),
        BLOCK_D=_pow2_at_least(head_dim),
    )


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use full-precision dots unless the user allowed TF32 globally.

    "upcast" works around the interpreter's bfloat16 dot (see forward._mma).
    """
    if dtype == torch.bfloat16 and INTERPRETED:
        return "upcast"
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@lru_cache(maxsize=64)
def _segment_ids(candidate_lengths: tuple, device: torch.device) -> torch.Tensor:
    """int32 candidate index of every prompt row (at least one element, for the pointer)."""
    ids = [c for c, n in enumerate(candidate_lengths) for _ in range(n)] or [-1]
    return torch.tensor(ids, dtype=torch.int32, device=device)


def _check_launchable(q: torch.Tensor) -> None:
    if q.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            "impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before fastdpl's kernels are "
            f"first imported to run them on the CPU; got tensors on {q.device}. Use impl='eager' instead."
        )
    head_dim = q.shape[-1]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: impl='triton' supports head dims {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, got {head_dim}")


def _nonempty_prompts(prompt: torch.Tensor) -> torch.Tensor:
    """Zero prompt rows: hand the kernel a valid pointer; its prompt loops do not run."""
    return prompt if prompt.shape[1] > 0 else prompt.new_zeros(prompt.shape[0], 1, prompt.shape[2])


def mixture_attention_forward(q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal):
    _check_launchable(q)
    lengths = tuple(int(n) for n in candidate_lengths)
    batch, heads, n_queries, head_dim = q.shape
    n_prompt, n_candidates = prompt_k.shape[1], len(lengths)
    out = torch.empty_like(q)
    row_max = torch.empty(batch, heads, n_queries, dtype=torch.float32, device=q.device)
    denominators = torch.empty(batch, heads, n_queries, n_candidates, dtype=torch.float32, device=q.device)
    pk, pv = _nonempty_prompts(prompt_k), _nonempty_prompts(prompt_v)
    blocks = _block_sizes(n_queries, head_dim, n_prompt, n_candidates)
    grid = (triton.cdiv(n_queries, blocks["BLOCK_M"]), batch * heads)
    mixture_attention_fwd_kernel[grid](
        q, k, v, pk, pv, _segment_ids(lengths, q.device), weights.to(torch.float32).contiguous(),
        out, row_max, denominators,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *pk.stride(), *pv.stride(),
        heads, n_queries, n_prompt, n_candidates, head_dim, head_dim ** -0.5 * LOG2E,
        CAUSAL=bool(causal), DOT_PRECISION=_dot_precision(q.dtype), num_warps=4, num_stages=2, **blocks,
    )
    return out, row_max, denominators


def mixture_attention_backward(grad_out, q, k, v, prompt_k, prompt_v, candidate_lengths, weights,
                               out, row_max, denominators, causal):
    _check_launchable(q)
    lengths = tuple(int(n) for n in candidate_lengths)
    q, k, v, out, grad_out = (t.contiguous() for t in (q, k, v, out, grad_out))
    batch, heads, n_queries, head_dim = q.shape
    n_prompt, n_candidates = prompt_k.shape[1], len(lengths)
    blocks = _block_sizes(n_queries, head_dim, n_prompt, n_candidates)
    precision = _dot_precision(q.dtype)
    sm_scale = head_dim ** -0.5
    f32 = dict(dtype=torch.float32, device=q.device)

    # Per-row delta and beta, the prompt part of dq, and partial prompt/weight grads.
    splits = min(MAX_PROMPT_SPLITS, batch * triton.cdiv(n_queries, blocks["BLOCK_M"]))
    delta = torch.empty(batch, heads, n_queries, **f32)
    beta = torch.empty(batch, heads, n_queries, **f32)
    dq_prompt = torch.empty(batch, heads, n_queries, head_dim, **f32)
    dpk_part = torch.zeros(splits, heads, n_prompt, head_dim, **f32)
    dpv_part = torch.zeros(splits, heads, n_prompt, head_dim, **f32)
    dw_part = torch.empty(splits, heads, n_candidates, **f32)
    pk, pv = _nonempty_prompts(prompt_k), _nonempty_prompts(prompt_v)
    weights32 = weights.to(torch.float32).contiguous()
    prompt_bwd_kernel[(splits, heads)](
        q, out, grad_out, pk, pv, _segment_ids(lengths, q.device), weights32, row_max, denominators,
        delta, beta, dq_prompt, dpk_part, dpv_part, dw_part,
        *q.stride(), *out.stride(), *grad_out.stride(), *pk.stride(), *pv.stride(),
        batch, heads, n_queries, n_prompt, n_candidates, head_dim, splits, sm_scale * LOG2E, sm_scale,
        BLOCK_M=blocks["BLOCK_M"], BLOCK_P=blocks["BLOCK_P"], BLOCK_C=blocks["BLOCK_C"],
        BLOCK_D=blocks["BLOCK_D"], DOT_PRECISION=precision, num_warps=4, num_stages=1,
    )

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(CAUSAL=bool(causal), BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"],
                  BLOCK_D=blocks["BLOCK_D"], DOT_PRECISION=precision, num_warps=4, num_stages=2)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    kv_bwd_kernel[(triton.cdiv(n_queries, blocks["BLOCK_N"]), batch * heads)](
        q, k, v, grad_out, row_max, delta, beta, dk, dv, *strides,
        heads, n_queries, head_dim, sm_scale * LOG2E, sm_scale, **common,
    )
    q_bwd_kernel[(triton.cdiv(n_queries, blocks["BLOCK_M"]), batch * heads)](
        q, k, v, grad_out, row_max, delta, beta, dq_prompt, dq, *strides,
        heads, n_queries, head_dim, sm_scale * LOG2E, sm_scale, **common,
    )
    # Fixed-order sums over the splits (no atomics): bitwise reproducible.
    dpk = dpk_part.sum(0).to(prompt_k.dtype)
    dpv = dpv_part.sum(0).to(prompt_v.dtype)
    dweights = dw_part.sum((0, 1)).to(weights.dtype)
    return dq, dk, dv, dpk, dpv, dweights
