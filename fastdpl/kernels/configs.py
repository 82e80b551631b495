"""Launch configurations of the fused kernels, chosen per shape from a small table.

Why a table and not ``triton.autotune``: the choice must be a pure function of
the shapes (and the GPU's arch), so that results are bitwise reproducible from one
process to the next, and every configuration the launcher can pick is compiled
ahead of time for sm_80, sm_90 and sm_100 by ``tests/test_compiled_kernels.py``
(registers, spills, shared memory, tensor-core dots) without a GPU.
``FASTDPL_TILES`` overrides the table for experiments (``forward=128x64w8s2,kv=...``),
see ``override``.

The rows come from compiling candidates (scripts/tile_sweep.py) and keeping, per
(kernel, N range, head dim, dtype), a large tile that ptxas fits without spilling
on every Triton the table is made for: 3.6, 3.8 and 3.9 (ptxas ships inside the
triton wheel, so register allocation changes with the wheel; the full compiled
matrix per version: benchmarks/results/2026-12-02-compiled-kernels-triton-*.md).
One table serves all three; a Triton not in that list gets the same table, and the
compile check, which CI runs on the Triton it installed, fails on any spill.

* N <= 64 (the truncated text tower, N ~ 8..20 per sequence; thousands of
  sequences): the row tile is the smallest power of two >= N (at least 16), so
  a 20-token sequence fills 20 of 32 rows instead of 20 of 64.
* N > 64, 16-bit inputs, head dim <= 64 (ViT-B/L, CLIP text): the forward takes
  128-row tiles with 8 warps (two Hopper warpgroups share each K/V tile: half
  the K/V traffic of 64-row tiles); the dK/dV kernel 64 keys per program over
  64-row steps, the dQ kernel 64x64 with 8 warps.
* head dim 128 (80 pads to 128): narrower tiles or more warps, as registers demand.
* fp32 inputs: the dots run as TF32x3 (three tensor-core products per product,
  fp32-level accuracy), whose operand splits take about three times the
  registers: 16-row tiles and, in the backward's score dots, head-dim chunks (``FP32``).
* every launch: a register ceiling of 255 (``REGISTER_CEILING``), not ptxas's
  occupancy-driven cap; per arch, a smaller tile where the tabled one does not fit (``on_arch``).

The prompt-gradient kernel has its own tiling (``prompt_tiling``), a function of
N, the head dim, P and the dtype only (never the GPU), so the order in which the
prompt gradients are summed never depends on the configurations above.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

import triton

# Largest number of programs sharing one head in the prompt backward.
MAX_PROMPT_SPLITS = 64


# Every launch's register ceiling, on every arch and Triton. Left to itself, ptxas caps some
# kernels below what they need (8-warp ones at 80 or 128 registers, 4-warp ones at 168, by
# version and arch) and spills a few bytes to fit two or three blocks per SM; these kernels
# keep their tiles in registers between dots, and a spill is a local-memory round trip inside
# the inner loop, so the ceiling is the hardware's 255 and ptxas takes what the code needs.
REGISTER_CEILING = 255


@dataclass(frozen=True)
class Tiles:
    """Block sizes and launch options of one kernel launch. ``head_chunk``: the head-dim chunk of
    the score dots (forward._head_dot; 0: the whole head dim at once). ``max_registers``: ptxas's
    per-thread register ceiling (Triton's ``maxnreg``; 0: ptxas's own choice, see REGISTER_CEILING)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    head_chunk: int = 0
    max_registers: int = REGISTER_CEILING

    def __str__(self):
        chunk = f"k{self.head_chunk}" if self.head_chunk else ""
        ceiling = f"r{self.max_registers}" if self.max_registers != REGISTER_CEILING else ""
        return f"{self.block_m}x{self.block_n}w{self.num_warps}s{self.num_stages}{chunk}{ceiling}"

    def block_dk(self, block_d: int) -> int:
        return min(self.head_chunk, block_d) if self.head_chunk else block_d

    def launch_options(self) -> dict:
        options = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.max_registers:
            options["maxnreg"] = self.max_registers
        return options


def pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(int(x), 1)))


def _rows(n: int) -> int:
    """The smallest power-of-two row tile >= n, between 16 and 64."""
    return min(64, pow2_at_least(n))


# fp32 inputs (TF32x3 or TF32 dots), every N and head dim: 16-row tiles. The score dots of dQ and
# of the prompt gradients run in head-dim chunks (forward._head_dot): a 16-row operand is held
# whole by every warp, and TF32x3 keeps two split copies of it.
FP32 = {"forward": Tiles(16, 32, 8, 2),
        "kv": Tiles(16, 32, 8, 2),
        "q": Tiles(16, 32, 4, 2, head_chunk=16),
        "prompt": Tiles(16, 16, 8, 1, head_chunk=32)}


def forward_prompt_block(n_prompt: int) -> int:
    """Prompt keys per step of the forward's two prompt passes: at most 32. With 64 (the LM
    candidates {0, 4, ..., 64} have P = 124) the 128-row bf16 tile needs ~300 registers on sm_90
    and spilled 96 B; 32 fits in 245 with no spill, for one more short loop trip per pass."""
    return min(32, pow2_at_least(n_prompt))


def forward_tiles(n: int, head_dim: int, is_fp32: bool, causal: bool) -> Tiles:
    if is_fp32:
        return FP32["forward"]
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
        if wide:  # TF32x3 at head dim 128: two stages need 255 registers and spill on triton 3.6
            return Tiles(16, 16, 8, 1)
        return Tiles(16, 16, 8, 2) if head_dim <= 16 or n <= 16 else FP32["kv"]
    if n <= 16:
        return Tiles(16, 16, 4, 2)
    if n <= 32 or wide:
        return Tiles(32, 32, 4, 2)
    return Tiles(64, 64, 8, 2)


def q_tiles(n: int, head_dim: int, is_fp32: bool, causal: bool) -> Tiles:
    """block_m: query rows per program; block_n: keys per step."""
    wide = head_dim > 64
    if is_fp32:
        return FP32["q"]
    if n <= 16:
        return Tiles(16, 16, 4, 1)
    if n <= 32:
        return Tiles(32, 32, 4, 1)
    if n <= 64:
        return Tiles(16, 64, 4, 1) if wide else Tiles(64, 64, 4, 1)
    return Tiles(32, 32, 8, 2) if wide else Tiles(64, 64, 8, 2)  # wide with 4 warps: 255 registers, spills


@dataclass(frozen=True)
class PromptTiling:
    block_m: int
    block_p: int
    splits: int
    prompt_blocks: int
    num_warps: int = 4
    head_chunk: int = 0
    max_registers: int = REGISTER_CEILING

    def launch(self) -> Tiles:
        """The launch options (block_n standing for the prompt block)."""
        return Tiles(self.block_m, self.block_p, self.num_warps, 1, self.head_chunk, self.max_registers)


def prompt_tiling(batch: int, n: int, head_dim: int, n_prompt: int, precision: str | None = None) -> PromptTiling:
    """Tiling of prompt_bwd_kernel: shapes and dot precision only (fixes the gradient reduction
    order). ``precision``: the fp32 dot precision ("tf32x3", "tf32", "ieee"), None for 16 bits."""
    fixed = override("prompt")
    chunk, registers = 0, REGISTER_CEILING
    if fixed:
        block_m, block_p, warps = fixed.block_m, fixed.block_n, fixed.num_warps
        chunk, registers = fixed.head_chunk, fixed.max_registers
    elif precision is not None:  # fp32 (FP32 above)
        fp32 = FP32["prompt"]
        block_m, block_p, warps, chunk, registers = (fp32.block_m, fp32.block_n, fp32.num_warps, fp32.head_chunk,
                                                     fp32.max_registers)
    elif head_dim > 64:
        block_m, block_p, warps = 16, 32, 8
    else:
        block_m, block_p, warps = min(32, _rows(n)), 32, 8
    block_p = min(block_p, pow2_at_least(n_prompt))
    splits = min(MAX_PROMPT_SPLITS, batch * triton.cdiv(n, block_m))
    return PromptTiling(block_m, block_p, splits, max(1, triton.cdiv(n_prompt, block_p)), num_warps=warps,
                        head_chunk=chunk, max_registers=registers)


TABLE = {"forward": forward_tiles, "kv": kv_tiles, "q": q_tiles}
_SPEC = re.compile(r"^(\d+)x(\d+)w(\d+)s(\d+)(?:k(\d+))?(?:r(\d+))?$")


def override(kernel: str) -> Tiles | None:
    """``FASTDPL_TILES="forward=128x64w8s2,q=64x32w4s2,prompt=64x32w8s1"``: fixed tiles for
    experiments (for ``prompt``: rows x prompt block, warps). Not for production runs:
    the prompt tiling fixes the prompt gradients' reduction order."""
    spec = os.environ.get("FASTDPL_TILES", "")
    for item in filter(None, spec.split(",")):
        name, _, tiles = item.partition("=")
        parsed = parse_tiles(tiles)
        if name.strip() not in (*TABLE, "prompt") or parsed is None:
            raise ValueError(f"FASTDPL_TILES: expected KERNEL=MxNwWsS[kK][rR] with KERNEL in {sorted(TABLE)} "
                             f"or prompt, got {item!r}")
        if name.strip() == kernel:
            return parsed
    return None


def parse_tiles(spec: str) -> Tiles | None:
    """``MxNwWsS[kK][rR]`` (as Tiles prints itself) -> Tiles; None if it does not parse."""
    match = _SPEC.match(spec.strip())
    if not match:
        return None
    m, n, w, s, k, r = match.groups()
    return Tiles(int(m), int(n), int(w), int(s), int(k or 0), REGISTER_CEILING if r is None else int(r))


def on_arch(kernel: str, tiles: Tiles, arch: int | None, is_fp32: bool) -> Tiles:
    """The table's tiles as launched on ``arch`` (10 * major + minor; None: as tabled), in 16
    bits, where the tabled tile needs more than 255 registers there: the 128x64 forward on
    sm_100 runs one stage (~180 registers without the K/V tile's second buffer); the 64x64
    dK/dV kernel on sm_80, where mma.sync keeps both accumulators in registers and triton 3.6
    spilled it (causal with two stages, not causal with one), takes 32 keys per program."""
    if arch is None or is_fp32:
        return tiles
    if kernel == "forward" and arch >= 100 and tiles.block_m == 128:
        return replace(tiles, num_stages=1)
    if kernel == "kv" and arch < 90 and (tiles.block_m, tiles.block_n, tiles.num_warps) == (64, 64, 8):
        return replace(tiles, block_n=32)
    return tiles


def tiles_for(kernel: str, n: int, head_dim: int, is_fp32: bool, causal: bool, arch: int | None = None) -> Tiles:
    """The launch tiles of ``kernel`` for these shapes on ``arch`` (FASTDPL_TILES first, as given)."""
    return override(kernel) or on_arch(kernel, TABLE[kernel](n, head_dim, is_fp32, causal), arch, is_fp32)
