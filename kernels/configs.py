"""Launch configurations of the fused kernels, chosen per shape from a small table.

Why a table and not ``triton.autotune``: the choice must be a pure function of
the shapes, so that results are bitwise reproducible from one process to the
next, and every configuration the launcher can pick is compiled ahead of time
for sm_90 and sm_80 by ``tests/test_compiled_kernels.py`` (registers, spills,
shared memory, tensor-core dots) without a GPU. ``FASTDPL_TILES`` overrides the
table for experiments (``forward=128x64w8s2,kv=...``), see ``override``.

The rows, and why (measured with ``kernels.compiled``; timings come from a GPU
run, benchmarks/results/):

* N <= 64 (the truncated text tower, N ~ 8..20 per sequence; thousands of
  sequences): the row tile is the smallest power of two >= N (at least 16), so
  a 20-token sequence fills 20 of 32 rows instead of 20 of 64. Keys come in one
  block. Few warps: each program is small and there are B*H of them.
* 64 < N <= 128 (the untruncated text tower, N = 77): 64-row tiles, 4 warps.
* N > 128 (the image tower, N = 197): forward with 128-row tiles and 8 warps
  (two Hopper warpgroups sharing each K/V tile, half the K/V traffic of
  64-row tiles); backward kernels with 64-row tiles (their working set is
  twice the forward's: q, dO and dk/dv or dq accumulators).
* head dim 128: 32-key blocks in the backward, to stay off the register cap.

The prompt-gradient kernel has its own tiling (``prompt_tiling``), a function of
N, the head dim and P only, so the order in which prompt and weight gradients
are summed never depends on the configurations above.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import triton

# Largest number of programs sharing one head in the prompt backward.
MAX_PROMPT_SPLITS = 64


@dataclass(frozen=True)
class Tiles:
    """Block sizes and launch options of one kernel launch."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __str__(self):
        return f"{self.block_m}x{self.block_n}w{self.num_warps}s{self.num_stages}"


def pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(int(x), 1)))


def _short_tiles(n: int) -> Tiles:
    block = pow2_at_least(n)
    return Tiles(block, block, 1 if block == 16 else 2 if block == 32 else 4, 1 if block <= 32 else 2)


def forward_tiles(n: int, head_dim: int, is_fp32: bool, causal: bool) -> Tiles:
    if n <= 64:
        return _short_tiles(n)
    if n <= 128 or head_dim > 64 or is_fp32:
        return Tiles(64, 64, 4, 2)
    return Tiles(128, 64, 8, 2)


def kv_tiles(n: int, head_dim: int, is_fp32: bool, causal: bool) -> Tiles:
    if n <= 64:
        return _short_tiles(n)
    return Tiles(64, 32 if head_dim > 64 else 64, 4, 2)


def q_tiles(n: int, head_dim: int, is_fp32: bool, causal: bool) -> Tiles:
    if n <= 64:
        return _short_tiles(n)
    return Tiles(64, 32 if head_dim > 64 else 64, 4, 2)


@dataclass(frozen=True)
class PromptTiling:
    block_m: int
    block_p: int
    splits: int
    prompt_blocks: int
    num_warps: int = 4


def prompt_tiling(batch: int, n: int, head_dim: int, n_prompt: int) -> PromptTiling:
    """Tiling of prompt_bwd_kernel: shapes only (fixes the gradient reduction order)."""
    block_m = min(64, pow2_at_least(n))
    block_p = min(32 if head_dim > 64 else 64, pow2_at_least(n_prompt))
    splits = min(MAX_PROMPT_SPLITS, batch * triton.cdiv(n, block_m))
    return PromptTiling(block_m, block_p, splits, max(1, triton.cdiv(n_prompt, block_p)),
                        num_warps=4 if block_m >= 64 else 2)


TABLE = {"forward": forward_tiles, "kv": kv_tiles, "q": q_tiles}
_SPEC = re.compile(r"^(\d+)x(\d+)w(\d+)s(\d+)$")


def override(kernel: str) -> Tiles | None:
    """``FASTDPL_TILES="forward=128x64w8s2,q=64x32w4s2"``: fixed tiles for experiments."""
    spec = os.environ.get("FASTDPL_TILES", "")
    for item in filter(None, spec.split(",")):
        name, _, tiles = item.partition("=")
        match = _SPEC.match(tiles.strip())
        if name.strip() not in TABLE or not match:
            raise ValueError(f"FASTDPL_TILES: expected KERNEL=MxNwWsS with KERNEL in {sorted(TABLE)}, got {item!r}")
        if name.strip() == kernel:
            return Tiles(*map(int, match.groups()))
    return None


def tiles_for(kernel: str, n: int, head_dim: int, is_fp32: bool, causal: bool) -> Tiles:
    return override(kernel) or TABLE[kernel](n, head_dim, is_fp32, causal)
