"""Host-side launchers of the fused mixture-of-prompt-lengths kernels.

``mixture_attention_forward`` returns ``(out, out_x, row_max, row_sum,
denominators)`` and ``mixture_attention_backward`` turns the saved tensors plus
``grad_out`` into the six gradients. Shapes: q (B, H, N, D), k, v (B, H_kv, N_k, D),
any strides; prompt_k, prompt_v (H_kv, P, D); weights (C,); key_mask None or (B, N_k)
bool; out, out_x (B, H, N, D); row_max and row_sum (B, H, N) float32 (log2 units for
the max); denominators (B, H, N, C) float32. Inputs are assumed validated by
``fastdpl.ops``.

Each launch is first described as a ``Launch`` (kernel, grid, arguments, tiles),
then run. ``forward_launches`` / ``backward_launches`` are what the launchers
run and what ``kernels.compiled`` compiles ahead of time for a GPU that is not
there, so the compiled-code checks see exactly the launches a GPU would get.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import triton

from . import configs
from .backward import kv_bwd_kernel, prompt_bwd_kernel, q_bwd_kernel
from .forward import mixture_attention_fwd_kernel
from .interpreter import fix_loop_bounds, interpreted

LOG2E = 1.4426950408889634
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
# Kernels were decorated in interpreter mode iff TRITON_INTERPRET was set when they were imported.
INTERPRETED = interpreted()
if INTERPRETED:
    fix_loop_bounds()  # Triton 3.6's interpreter on NumPy >= 2.5 (kernels/interpreter.py)
FP32_PRECISIONS = ("tf32x3", "tf32", "ieee")
_fp32_precision = os.environ.get("FASTDPL_FP32_PRECISION", "tf32x3")


def set_fp32_precision(precision: str) -> None:
    """How fp32 inputs' dots run: "tf32x3" (default: tensor cores, fp32-level accuracy from
    three TF32 products per product), "tf32" (one TF32 product, ~1e-3 relative) or "ieee"
    (plain fp32 FMA, no tensor cores). Also ``FASTDPL_FP32_PRECISION``; torch's
    ``allow_tf32`` switch selects "tf32" whatever is set here."""
    global _fp32_precision
    if precision not in FP32_PRECISIONS:
        raise ValueError(f"precision must be one of {FP32_PRECISIONS}, got {precision!r}")
    _fp32_precision = precision


def dot_precision(dtype: torch.dtype) -> str:
    """The tl.dot input precision for inputs of ``dtype``.

    "upcast" works around the interpreter's bfloat16 dot (see forward._mma);
    16-bit inputs always use tensor cores, whatever the string says.
    """
    if dtype == torch.bfloat16 and INTERPRETED:
        return "upcast"
    if dtype == torch.float32:
        if _fp32_precision not in FP32_PRECISIONS:
            raise ValueError(f"FASTDPL_FP32_PRECISION must be one of {FP32_PRECISIONS}, got {_fp32_precision!r}")
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else _fp32_precision
    return "ieee"


@dataclass
class Launch:
    """One kernel launch: what runs it, and what the ahead-of-time compiler needs."""

    name: str
    kernel: object
    grid: tuple
    args: tuple
    meta: dict = field(default_factory=dict)

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.meta)


@lru_cache(maxsize=64)
def _segment_ids(candidate_lengths: tuple, device: torch.device) -> torch.Tensor:
    """int32 candidate index of every prompt row (at least one element, for the pointer)."""
    ids = [c for c, n in enumerate(candidate_lengths) for _ in range(n)] or [-1]
    return torch.tensor(ids, dtype=torch.int32, device=device)


@lru_cache(maxsize=16)
def _empty_prompt(heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(heads, 1, head_dim, dtype=dtype, device=device)


def _nonempty_prompts(prompt: torch.Tensor) -> torch.Tensor:
    """Zero prompt rows: hand the kernel a valid pointer; its prompt loops do not run."""
    if prompt.shape[1] > 0:
        return prompt
    return _empty_prompt(prompt.shape[0], prompt.shape[2], prompt.dtype, prompt.device)


def check_launchable(q: torch.Tensor) -> None:
    if q.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            "impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before fastdpl's kernels are "
            f"first imported to run them on the CPU; got tensors on {q.device}. Use impl='eager' instead."
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q: impl='triton' supports float16, bfloat16 and float32, got {q.dtype}; "
                        "use impl='eager' or 'reference' for float64")
    head_dim = q.shape[-1]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: impl='triton' supports head dims {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, got {head_dim}")


@lru_cache(maxsize=16)
def _device_arch(device: torch.device) -> int | None:
    """The compute capability as 10 * major + minor (90 for sm_90); None off CUDA (the interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def launch_arch(q: torch.Tensor, arch: int | None) -> int | None:
    """The arch the launches are tiled for: ``arch`` when given (ahead-of-time compiles), else q's GPU."""
    return arch if arch is not None else _device_arch(q.device)


def _key_mask_args(key_mask, placeholder):
    """(pointer, batch stride, key stride) of the key mask as bytes; a placeholder pointer without one."""
    if key_mask is None:
        return placeholder, 0, 0
    as_bytes = key_mask.view(torch.uint8)  # same strides; the kernels test != 0
    return (as_bytes, *as_bytes.stride())


def _attention_shape(q, k):
    """(H, GROUP, N, N_K, KEY_OFFSET): query heads, query heads per key/value head, queries, keys,
    and the position of query 0 among the keys (the queries are the last N of N_K)."""
    heads, n_queries, n_keys = q.shape[1], q.shape[2], k.shape[2]
    return heads, heads // k.shape[1], n_queries, n_keys, n_keys - n_queries


def _tiles(kernel, q, causal, arch):
    return configs.tiles_for(kernel, q.shape[2], q.shape[3], q.dtype == torch.float32, bool(causal), arch)


def _meta(tiles: configs.Tiles, **constexprs):
    return dict(constexprs, **tiles.launch_options())


def forward_launches(q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal, scale=None, key_mask=None,
                     arch=None):
    """Allocate the forward's outputs and describe its one launch, tiled for ``arch`` (default: q's GPU)."""
    arch = launch_arch(q, arch)
    lengths = tuple(int(n) for n in candidate_lengths)
    batch, heads, n_queries, head_dim = q.shape
    n_prompt, n_candidates = prompt_k.shape[1], len(lengths)
    out = torch.empty(batch, heads, n_queries, head_dim, dtype=q.dtype, device=q.device)
    out_x = torch.empty_like(out)  # same strides as out: the kernel uses one offset for both
    f32 = dict(dtype=torch.float32, device=q.device)
    row_max, row_sum = torch.empty(batch, heads, n_queries, **f32), torch.empty(batch, heads, n_queries, **f32)
    denominators = torch.empty(batch, heads, n_queries, n_candidates, **f32)
    pk, pv = _nonempty_prompts(prompt_k), _nonempty_prompts(prompt_v)
    tiles = _tiles("forward", q, causal, arch)
    block_d = configs.pow2_at_least(head_dim)
    scale = head_dim ** -0.5 if scale is None else scale
    segment_ids = _segment_ids(lengths, q.device)
    launch = Launch(
        "forward", mixture_attention_fwd_kernel, (triton.cdiv(n_queries, tiles.block_m), batch * heads),
        (q, k, v, pk, pv, segment_ids, weights.to(torch.float32).contiguous(),
         out, out_x, row_max, row_sum, denominators,
         *q.stride(), *k.stride(), *v.stride(), *out.stride(), *pk.stride(), *pv.stride(),
         *_key_mask_args(key_mask, segment_ids), *_attention_shape(q, k),
         n_prompt, n_candidates, head_dim, scale * LOG2E),
        _meta(tiles, CAUSAL=bool(causal), HAS_KEY_MASK=key_mask is not None, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
              BLOCK_P=configs.forward_prompt_block(n_prompt), BLOCK_C=configs.pow2_at_least(n_candidates),
              BLOCK_D=block_d, BLOCK_DK=tiles.block_dk(block_d), DOT_PRECISION=dot_precision(q.dtype)),
    )
    return (out, out_x, row_max, row_sum, denominators), [launch]


def backward_launches(grad_out, q, k, v, prompt_k, prompt_v, candidate_lengths, weights,
                      out_x, row_max, row_sum, denominators, causal, scale=None, key_mask=None, arch=None):
    """Allocate the backward's buffers and describe its three launches (in order), tiled for ``arch``."""
    arch = launch_arch(q, arch)
    lengths = tuple(int(n) for n in candidate_lengths)
    batch, heads, n_queries, head_dim = q.shape
    n_prompt, n_candidates = prompt_k.shape[1], len(lengths)
    f32 = dict(dtype=torch.float32, device=q.device)
    block_c, block_d = configs.pow2_at_least(n_candidates), configs.pow2_at_least(head_dim)
    precision = dot_precision(q.dtype)
    sm_scale = head_dim ** -0.5 if scale is None else scale
    shape = _attention_shape(q, k)
    group, n_keys, kv_heads = shape[1], shape[3], k.shape[1]
    # The prompt gradients sum over every (sequence, query head) sharing one key/value head.
    tiling = configs.prompt_tiling(batch * group, n_queries, head_dim, n_prompt,
                                   precision if q.dtype == torch.float32 else None)
    prompt_tiles = tiling.launch()

    delta = torch.empty(batch, heads, n_queries, **f32)
    beta = torch.empty(batch, heads, n_queries, **f32)
    y_rows = torch.empty(batch, heads, n_queries, n_candidates, **f32)  # Y_c per row
    d_prompt_rows = torch.empty(batch, heads, n_queries, n_candidates, **f32)  # D_c per row, for dt
    d_rows = torch.empty(batch, heads, n_queries, n_candidates, **f32)  # D_c per row, exact X, for dw
    # Every slot is written by exactly one program (zeros where it had no tiles).
    dpk_part = torch.empty(tiling.splits, kv_heads, n_prompt, head_dim, **f32)
    dpv_part = torch.empty(tiling.splits, kv_heads, n_prompt, head_dim, **f32)
    pk, pv = _nonempty_prompts(prompt_k), _nonempty_prompts(prompt_v)
    segment_ids, weights32 = _segment_ids(lengths, q.device), weights.to(torch.float32).contiguous()
    key_mask_args = _key_mask_args(key_mask, segment_ids)
    prompt = Launch(
        "prompt_bwd", prompt_bwd_kernel, (tiling.splits, kv_heads, tiling.prompt_blocks),
        (q, out_x, grad_out, pk, pv, segment_ids, weights32,
         row_max, row_sum, denominators, delta, beta, y_rows, d_prompt_rows, dpk_part, dpv_part,
         *q.stride(), *out_x.stride(), *grad_out.stride(), *pk.stride(), *pv.stride(),
         batch, heads, group, n_queries, n_prompt, n_candidates, head_dim, tiling.splits, sm_scale * LOG2E,
         sm_scale),
        _meta(prompt_tiles, BLOCK_M=tiling.block_m, BLOCK_P=tiling.block_p, BLOCK_C=block_c, BLOCK_D=block_d,
              BLOCK_DK=prompt_tiles.block_dk(block_d), DOT_PRECISION=precision),
    )

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    kv = _tiles("kv", q, causal, arch)
    kv_launch = Launch(
        "kv_bwd", kv_bwd_kernel, (triton.cdiv(n_keys, kv.block_n), batch * kv_heads),
        (q, k, v, grad_out, dk, dv, row_max, delta, beta, *strides, *dk.stride(), *dv.stride(),
         *key_mask_args, *shape, head_dim, sm_scale * LOG2E, sm_scale),
        _meta(kv, CAUSAL=bool(causal), HAS_KEY_MASK=key_mask is not None, BLOCK_M=kv.block_m, BLOCK_N=kv.block_n, BLOCK_D=block_d,
              DOT_PRECISION=precision),
    )
    qt = _tiles("q", q, causal, arch)
    q_launch = Launch(
        "q_bwd", q_bwd_kernel, (triton.cdiv(n_queries, qt.block_m), batch * heads),
        (q, k, v, grad_out, dq, row_max, delta, beta, pk, pv, segment_ids, weights32, denominators, y_rows,
         d_prompt_rows, d_rows, *strides, *dq.stride(), *pk.stride(), *pv.stride(),
         *key_mask_args, *shape, n_prompt, n_candidates, head_dim, sm_scale * LOG2E, sm_scale),
        _meta(qt, CAUSAL=bool(causal), HAS_KEY_MASK=key_mask is not None, BLOCK_M=qt.block_m, BLOCK_N=qt.block_n, BLOCK_P=tiling.block_p,
              BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_DK=qt.block_dk(block_d), DOT_PRECISION=precision),
    )

    def finish():
        # Fixed-order sums over the splits and the rows (no atomics): bitwise reproducible.
        return (dq, dk, dv, dpk_part.sum(0).to(prompt_k.dtype), dpv_part.sum(0).to(prompt_v.dtype),
                d_rows.sum((0, 1, 2)).to(weights.dtype))

    return finish, [prompt, kv_launch, q_launch]


def mixture_attention_forward(q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal, scale=None,
                              key_mask=None):
    check_launchable(q)
    outputs, launches = forward_launches(q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal, scale,
                                         key_mask)
    for launch in launches:
        launch()
    return outputs


def mixture_attention_backward(grad_out, q, k, v, prompt_k, prompt_v, candidate_lengths, weights,
                               out_x, row_max, row_sum, denominators, causal, scale=None, key_mask=None):
    check_launchable(q)
    finish, launches = backward_launches(grad_out, q, k, v, prompt_k, prompt_v, candidate_lengths, weights,
                                         out_x, row_max, row_sum, denominators, causal, scale, key_mask)
    for launch in launches:
        launch()
    return finish()
