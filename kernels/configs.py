"""Launch configurations of the fused kernels, chosen per shape from a small table.

Why a table and not ``triton.autotune``: the choice must be a pure function of
the shapes, so that results are bitwise reproducible from one process to the
next, and every configuration the launcher can pick is compiled ahead of time
for sm_90 and sm_80 by ``tests/test_compiled_kernels.py`` (registers, spills,
shared memory, tensor-core dots) without a GPU. ``FASTDPL_TILES`` overrides the
table for experiments (``forward=128x64w8s2,kv=...``), see ``override``.

The rows come from compiling candidates for sm_90 and keeping, per (kernel, N
range, head dim, dtype), a large tile that ptxas fits without spilling (registers
and spills per choice: benchmarks/results/2026-11-23-compiled-kernels.md):

* N <= 64 (the truncated text tower, N ~ 8..20 per sequence; thousands of
  sequences): the row tile is the smallest power of two >= N (at least 16), so
  a 20-token sequence fills 20 of 32 rows instead of 20 of 64.
* N > 64, 16-bit inputs, head dim <= 64 (ViT-B/L, CLIP text): the forward takes
  128-row tiles with 8 warps (two Hopper warpgroups share each K/V tile: half
  the K/V traffic of 64-row tiles); the dK/dV kernel 128 keys per program over
  32-row steps, the dQ kernel 64x64 with 8 warps.
* head dim 128 (80 pads to 128): narrower tiles or more warps, as registers demand.
* fp32 inputs: the dots run as TF32x3 (three tensor-core products per product,
  fp32-level accuracy), whose operand splits take about three times the
  registers: 16- and 32-row tiles with 8 warps. The backward still spills in a
  few fp32 cases whatever the tile (``known_spill``).

The prompt-gradient kernel has its own tiling (``prompt_tiling``), a function of
N, the head dim, P and the dtype only, so the order in which the prompt
gradients are summed never depends on the configurations above.
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


def _rows(n: int) -> int:
    """The smallest power-of-two row tile >= n, between 16 and 64."""
    return min(64, pow2_at_least(n))


def forward_tiles(n: int, head_dim: int, is_fp32: bool, causal: bool) -> Tiles:
    if is_fp32:
        return Tiles(16, 32, 8, 2)
    wide = head_dim > 64
    if n <= 16:
        return Tiles(16, 16, 4, 2)
    if n <= 32:
        return Tiles(32, 32, 8, 2)
    if n <= 64 or wide:
        return Tiles(64, 64, 8, 2)
    return Tiles(128, 64, 8, 2)


def kv_tiles(n: int, head_dim: int, is_fp32: bool, causal: bool) -> Tiles:
    """block_m: query rows per step; block_n: keys per program."""
    wide = head_dim > 64
    if is_fp32:
        return Tiles(16, 16, 8, 2) if wide or head_dim <= 16 or n <= 16 else Tiles(16, 32, 8, 2)
    if n <= 16:
        return Tiles(16, 16, 4, 2)
    if n <= 32 or wide:
        return Tiles(32, 32, 4, 2)
    return Tiles(64, 64, 8, 2)


def q_tiles(n: int, head_dim: int, is_fp32: bool, causal: bool) -> Tiles:
    """block_m: query rows per program; block_n: keys per step."""
    wide = head_dim > 64
    if is_fp32:
        return Tiles(16, 32, 4, 2)
    if n <= 16:
        return Tiles(16, 16, 4, 1)
    if n <= 32:
        return Tiles(32, 32, 4, 1)
    if n <= 64:
        return Tiles(16, 64, 4, 1) if wide else Tiles(64, 64, 4, 1)
    return Tiles(32, 32, 4, 2) if wide else Tiles(64, 64, 8, 2)


def known_spill(kernel: str, arch: int, dtype: str, precision: str | None, head_dim: int) -> bool:
    """The named shortfall: fp32 as TF32x3, whose operand splits take about three times the
    registers, still spills in the backward whatever the tile (smallest found at head dim 128:
    prompt 1268 B at 16x16 and, on sm_90, dQ 44 B at 16x32; prompt 16 B at head dim 64 on sm_80)."""
    if dtype != "float32" or precision != "tf32x3":
        return False
    if kernel == "prompt_bwd":
        return head_dim > 64 or (head_dim > 16 and arch == 80)
    return kernel == "q_bwd" and head_dim > 64 and arch == 90


@dataclass(frozen=True)
class PromptTiling:
    block_m: int
    block_p: int
    splits: int
    prompt_blocks: int
    num_warps: int = 4


def prompt_tiling(batch: int, n: int, head_dim: int, n_prompt: int, precision: str | None = None) -> PromptTiling:
    """Tiling of prompt_bwd_kernel: shapes and dot precision only (fixes the gradient reduction
    order). ``precision``: the fp32 dot precision ("tf32x3", "tf32", "ieee"), None for 16 bits."""
    fixed = override("prompt")
    if fixed:
        block_m, block_p, warps = fixed.block_m, fixed.block_n, fixed.num_warps
    elif precision is not None:  # fp32; plain tf32 at head dim <= 64 spills with 8 warps (capped at 128)
        block_m, block_p, warps = 16, 16, 8 if precision == "tf32x3" or head_dim > 64 else 4
    elif head_dim > 64:
        block_m, block_p, warps = 16, 32, 8
    else:
        block_m, block_p, warps = min(32, _rows(n)), 32, 8
    block_p = min(block_p, pow2_at_least(n_prompt))
    splits = min(MAX_PROMPT_SPLITS, batch * triton.cdiv(n, block_m))
    return PromptTiling(block_m, block_p, splits, max(1, triton.cdiv(n_prompt, block_p)), num_warps=warps)


TABLE = {"forward": forward_tiles, "kv": kv_tiles, "q": q_tiles}
_SPEC = re.compile(r"^(\d+)x(\d+)w(\d+)s(\d+)$")


def override(kernel: str) -> Tiles | None:
    """``FASTDPL_TILES="forward=128x64w8s2,q=64x32w4s2,prompt=64x32w8s1"``: fixed tiles for
    experiments (for ``prompt``: rows x prompt block, warps). Not for production runs:
    the prompt tiling fixes the prompt gradients' reduction order."""
    spec = os.environ.get("FASTDPL_TILES", "")
    for item in filter(None, spec.split(",")):
        name, _, tiles = item.partition("=")
        match = _SPEC.match(tiles.strip())
        if name.strip() not in (*TABLE, "prompt") or not match:
            raise ValueError(f"FASTDPL_TILES: expected KERNEL=MxNwWsS with KERNEL in {sorted(TABLE)}, got {item!r}")
        if name.strip() == kernel:
            return Tiles(*map(int, match.groups()))
    return None


def tiles_for(kernel: str, n: int, head_dim: int, is_fp32: bool, causal: bool) -> Tiles:
    return override(kernel) or TABLE[kernel](n, head_dim, is_fp32, causal)
