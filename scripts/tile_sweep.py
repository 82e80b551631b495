"""Compile candidate launch tiles ahead of time and record registers, spills and dots per choice.

The tile table (fastdpl/kernels/configs.py) is chosen from these sweeps: per (kernel, dtype and fp32 dot
precision, head dim, mask, arch) a large tile that ptxas fits without spilling, with every main
dot on tensor cores, on every Triton version the table is made for. ptxas ships inside the triton
wheel, so register allocation changes with the wheel: run the sweep once per version, each in its
own process (another version without a second torch: ``pip install --no-deps --target DIR
triton==X``, then ``PYTHONPATH=DIR``), and compare the JSON files:

    PYTHONPATH=/path/triton-3.6 python scripts/tile_sweep.py --out sweep-3.6.json
    python scripts/tile_sweep.py --out sweep-3.8.json --kernels prompt --dtypes float32/tf32x3

N's value never changes the compiled code (Triton specialises an integer only on being 1 or a
multiple of 16, and none of the swept N is), so one N per table row is enough; head dim 80
compiles as 128 (BLOCK_D 128, D a multiple of 16) and is not swept apart.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import triton

from fastdpl.kernels import compiled
from fastdpl.kernels.configs import Tiles, parse_tiles

KERNELS = {"forward": "forward", "kv": "kv_bwd", "q": "q_bwd", "prompt": "prompt_bwd"}
# Candidates: rows x columns (keys, or prompt rows for "prompt"), warps, stages (prompt: 1 stage).
ROWS, COLUMNS, WARPS, STAGES = (16, 32, 64, 128), (16, 32, 64), (4, 8), (1, 2, 3)
# A row tile >= N is never chosen for short N, so each table row's N bounds the rows swept.
N_FOR_ROWS = {16: 12, 32: 20, 64: 50, 128: 197}


def candidates(kernel: str):
    if kernel == "prompt":
        return [Tiles(m, p, w, 1) for m, p, w in itertools.product((16, 32, 64), (16, 32), WARPS)]
    return [Tiles(m, n, w, s) for m, n, w, s in itertools.product(ROWS, COLUMNS, WARPS, STAGES)
            if not (m == 128 and n == 16)]


def _tiles(spec: str) -> Tiles:
    tiles = parse_tiles(spec)
    if tiles is None:
        raise SystemExit(f"--tiles: expected MxNwWsS[kK][rR], got {spec!r}")
    return tiles


def _one(job):
    kernel, (dtype, precision), head_dim, causal, arch, tiles = job
    os.environ["FASTDPL_TILES"] = f"{kernel}={tiles}"
    variant = compiled.Variant(dtype, precision, head_dim, N_FOR_ROWS[tiles.block_m], causal, arch)
    launch = next(x for x in compiled.launches_for(variant) if x.name == KERNELS[kernel])
    try:
        row = compiled.inspect_launch(launch, compiled.TARGETS[arch])
    except Exception as exc:  # recorded, never fatal: a sweep explores
        row = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return {"kernel": kernel, "dtype": dtype, "precision": precision, "head_dim": head_dim, "causal": causal,
            "arch": arch, "tiles": str(tiles), **{k: v for k, v in row.items() if k != "kernel"}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--kernels", default="forward,kv,q,prompt")
    parser.add_argument("--dtypes", default="float32/tf32x3,float32/tf32,float16,bfloat16")
    parser.add_argument("--head-dims", default="16,64,128")
    parser.add_argument("--arch", default="sm80,sm90,sm100")
    parser.add_argument("--causal", default="both", choices=("both", "true", "false"))
    parser.add_argument("--tiles", default="", help="only these, e.g. 16x32w8s2,16x32w8s2k32r0 (k: head-dim "
                                                    "chunk, r: register ceiling; default: every candidate)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if triton.knobs.runtime.interpret:
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    precisions = [(d.split("/")[0], d.split("/")[1] if "/" in d else None) for d in args.dtypes.split(",")]
    masks = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    fixed = [_tiles(t) for t in filter(None, args.tiles.split(","))]
    jobs = []
    for kernel in args.kernels.split(","):
        for prec, d, causal, arch in itertools.product(precisions, args.head_dims.split(","),
                                                        masks if kernel != "prompt" else (False,),
                                                        args.arch.split(",")):
            for tiles in fixed or candidates(kernel):
                jobs.append((kernel, prec, int(d), causal, arch, tiles))
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(_one, jobs, chunksize=4))
    with open(args.out, "w") as f:
        json.dump({"triton": triton.__version__, "rows": rows}, f, indent=0)
    print(f"{len(rows)} compiles in {time.perf_counter() - started:.0f} s (triton {triton.__version__})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
