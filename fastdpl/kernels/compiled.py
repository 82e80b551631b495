"""What a GPU would run: the launcher's own launches compiled ahead of time, no GPU needed.

``forward_launches`` / ``backward_launches`` describe every launch (kernel,
arguments, constexprs, warps, stages); here each is specialised exactly as
Triton's JIT would specialise it at launch (its own binder, on CPU tensors of
the right shapes, dtypes and strides) and compiled with ``triton.compile`` for a
fixed ``GPUTarget`` (sm_80, sm_90, sm_100; ptxas, and for Blackwell ptxas-blackwell, ship
inside the triton wheel, so register allocation is that of the installed Triton). Each
result reports:

* registers per thread and spill stores/loads, from ptxas's own ``-v`` log;
* shared memory per block, against the part's opt-in limit;
* every dot of the kernel and where it runs: the TTGIR result encoding is
  ``#mma`` (tensor cores: wgmma on sm_90, mma.sync otherwise), a ``ttng.tc_gen5_mma``
  (sm_100's tcgen05, accumulating in tensor memory), or ``#blocked``
  (CUDA-core FMA), and each dot is attributed to the helper it comes from
  (``_mma``: the QK^T, PV, dO V^T, dS K, dS^T Q family; ``_per_candidate``: the
  exact one-hot per-candidate gathers, which are meant to stay in fp32 FMA).

Run in a process where TRITON_INTERPRET is unset (interpreted kernels cannot be
compiled). ``python -m fastdpl.kernels.compiled --help``: the CI subset, the full
matrix, a markdown table, or ``--target native`` on a GPU machine.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget

from . import forward, mixture_attention
from .mixture_attention import backward_launches, forward_launches

TARGETS = {"sm90": GPUTarget("cuda", 90, 32), "sm80": GPUTarget("cuda", 80, 32), "sm100": GPUTarget("cuda", 100, 32)}
ARCHES = ("sm90", "sm80", "sm100")
# Largest dynamic shared memory one block may opt in to (bytes): H100 227 KB, A100 163 KB, B200 227 KB.
SHARED_LIMIT = {90: 232448, 80: 166912, 100: 232448}
# (dtype, fp32 dot precision): fp32 as users get it by default, and with TF32 allowed.
PRECISIONS = [("float32", "tf32x3"), ("float32", "tf32"), ("float16", None), ("bfloat16", None)]
HEAD_DIMS = (16, 64, 80, 128)
# One N per row of the tile table (configs.py): 16-, 32- and 64-row short tiles,
# the untruncated text tower, the image tower.
SEQ_LENS = (12, 20, 50, 77, 197)
HEADS = {16: 4, 64: 12, 80: 8, 128: 8}
LENGTHS = (0, 1, 2, 3, 4, 5, 6)
# Language-model rows: a Llama-like layer (32 query heads over 8 key/value heads), causal over a
# padded batch (a key mask), the LM candidate lengths, prefill/training lengths, bf16 and fp32.
LM_HEADS, LM_KV_HEADS = 32, 8
LM_LENGTHS = (0, 4, 8, 16, 32, 64)
LM_SEQ_LENS = (512, 2048)
LM_HEAD_DIMS = (64, 128)
LM_PRECISIONS = [("float32", "tf32x3"), ("bfloat16", None)]
# ViT classifier rows (fastdpl.vit): ViT-B/16's image tower (197 tokens, 12 heads of 64), not
# causal, VPT-deep's candidate lengths; CI compiles bf16 and fp32 as users get it, full all four.
VIT_LENGTHS = (0, 1, 5, 10)  # fastdpl.vit.VIT_LENGTHS (not imported: it would import timm here)
VIT_N, VIT_HEAD_DIM = 197, 64
VIT_CI_PRECISIONS = [("float32", "tf32x3"), ("bfloat16", None)]


@dataclass(frozen=True)
class Variant:
    dtype: str
    precision: str | None
    head_dim: int
    n: int
    causal: bool
    arch: str
    family: str = "clip"  # "lm": grouped-query heads, a key mask and the LM candidate lengths; "vit": VIT_LENGTHS

    def label(self):
        prec = f"/{self.precision}" if self.precision else ""
        family = {"lm": f" lm GQA{LM_HEADS}/{LM_KV_HEADS} masked", "vit": f" vit lengths {list(VIT_LENGTHS)}"}
        return (f"{self.arch} {self.dtype}{prec} D{self.head_dim} N{self.n}{' causal' if self.causal else ''}"
                f"{family.get(self.family, '')}")


def lm_rows(arches=ARCHES) -> list[Variant]:
    """Every LM row (N x head dim x precision, causal and masked) on every arch."""
    return [Variant(d, p, h, n, True, a, "lm") for a, (d, p), h, n in
            itertools.product(arches, LM_PRECISIONS, LM_HEAD_DIMS, LM_SEQ_LENS)]


def vit_rows(arches=ARCHES, precisions=PRECISIONS) -> list[Variant]:
    """ViT-B/16 with VPT-deep's candidate lengths, in each precision, on every arch."""
    return [Variant(d, p, VIT_HEAD_DIM, VIT_N, False, a, "vit") for a, (d, p) in itertools.product(arches, precisions)]


def full_matrix(arches=ARCHES) -> list[Variant]:
    return [Variant(d, p, h, n, c, a) for a, (d, p), h, n, c in
            itertools.product(arches, PRECISIONS, HEAD_DIMS, SEQ_LENS, (False, True))] + lm_rows(arches) + \
        vit_rows(arches)


def ci_subset(arches=ARCHES) -> list[Variant]:
    """Every precision x head dim on every arch; N and causal cycle so that each tile-table
    row shows up with each precision and both masks (a covering set, not the product); and
    every LM row (its two N share one specialisation, so they cost one compile)."""
    out = []
    for a in arches:
        for i, ((d, p), h) in enumerate(itertools.product(PRECISIONS, HEAD_DIMS)):
            out.append(Variant(d, p, h, SEQ_LENS[i % len(SEQ_LENS)], bool((i // len(SEQ_LENS)) % 2), a))
    return out + lm_rows(arches) + vit_rows(arches, VIT_CI_PRECISIONS)


def smoke_matrix(arches=("sm90",)) -> list[Variant]:
    """One variant: keeps the command working in CI's smoke run of benchmarks/gpu_check.sh."""
    return [Variant("bfloat16", None, 64, 77, True, a) for a in arches]


MATRICES = {"smoke": smoke_matrix, "ci": ci_subset, "full": full_matrix}


def launches_for(variant: Variant, batch: int = 2, device: str = "cpu"):
    """The forward and backward launches the launcher makes for this shape (CPU tensors
    for ahead-of-time compilation; CUDA tensors for the native check on a GPU)."""
    dtype = getattr(torch, variant.dtype)
    n, d = variant.n, variant.head_dim
    key_mask, lengths = None, LENGTHS
    if variant.family == "lm":
        # q, k, v as transformers hands them over: (B, L, H, D) projections transposed to (B, H, L, D).
        q = torch.empty(batch, n, LM_HEADS, d, dtype=dtype, device=device).transpose(1, 2)
        k, v = torch.empty(2, batch, n, LM_KV_HEADS, d, dtype=dtype, device=device).transpose(2, 3).unbind(0)
        key_mask, lengths = torch.ones(batch, n, dtype=torch.bool, device=device), LM_LENGTHS
    else:
        # q, k, v as strided views of one packed projection, the layout the towers produce.
        packed = torch.empty(batch, n, 3, HEADS[d], d, dtype=dtype, device=device)
        q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
        lengths = VIT_LENGTHS if variant.family == "vit" else lengths
    prompts = torch.empty(2, k.shape[1], sum(lengths), d, dtype=dtype, device=device)
    weights = torch.full((len(lengths),), 1 / len(lengths), device=device)
    previous = mixture_attention._fp32_precision, torch.backends.cuda.matmul.allow_tf32
    try:
        mixture_attention.set_fp32_precision("tf32x3")
        torch.backends.cuda.matmul.allow_tf32 = variant.precision == "tf32"
        arch = TARGETS[variant.arch].arch if variant.arch in TARGETS else None
        (out, out_x, row_max, row_sum, denominators), fwd = forward_launches(
            q, k, v, prompts[0], prompts[1], lengths, weights, variant.causal, key_mask=key_mask, arch=arch)
        _, bwd = backward_launches(out.transpose(1, 2).contiguous().transpose(1, 2), q, k, v, prompts[0],
                                   prompts[1], lengths, weights, out_x, row_max, row_sum, denominators,
                                   variant.causal, key_mask=key_mask, arch=arch)
    finally:
        mixture_attention._fp32_precision, torch.backends.cuda.matmul.allow_tf32 = previous
    return fwd + bwd


def _bind(launch, target: GPUTarget):
    """Triton's own binder (3.4+) on a launch: what a launch would specialise the kernel to."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, kwargs = launch.kernel, dict(launch.meta)
    if not hasattr(kernel, "params"):
        raise RuntimeError("kernels are interpreted (TRITON_INTERPRET=1): compile in a process without it")
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    return backend, kwargs, binder(*launch.args, **kwargs)


def specialization_key(launch, target: GPUTarget) -> tuple:
    """Two launches with the same key compile to the same binary: the same kernel, arch,
    argument specialisation (dtypes, alignment, integers equal to 1 or divisible by 16) and
    constexprs/options. Shapes that differ only in N's value, for example, share one compile."""
    _, kwargs, (_, specialization, options) = _bind(launch, target)
    return (launch.name, target.arch, repr(specialization), repr(sorted(kwargs.items())), repr(options))


def compile_launch(launch, target: GPUTarget):
    """triton.compile of one launch, specialised by Triton's own binder as a launch would be."""
    from triton.compiler import ASTSource

    backend, kwargs, (bound, specialization, options) = _bind(launch, target)
    kernel = launch.kernel
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _source_line(fn, needle):
    lines, start = inspect.getsourcelines(fn.fn if hasattr(fn, "fn") else fn)
    return start + next(i for i, line in enumerate(lines) if needle in line)


# Where each family of dots is written (file line of its tl.dot call).
DOT_SITES = {
    "main": _source_line(forward._mma, "input_precision=DOT_PRECISION"),
    "gather": _source_line(forward._per_candidate, "tl.dot("),
}


def classify_dots(ttgir: str) -> dict:
    """Count the kernel's dots by origin (main / gather) and unit (tensor core / FMA)."""
    locs = dict(re.findall(r"^(#loc\d+) = (loc\(.*\))$", ttgir, re.M))

    def origin(loc):
        # Follow callsite(#callee at #caller) to the innermost file:line.
        for _ in range(16):
            text = locs.get(loc, "")
            callee = re.match(r"loc\(callsite\((#loc\d+) at", text)
            if callee:
                loc = callee.group(1)
                continue
            line = re.search(r':(\d+):\d+\)', text)
            named = re.match(r"loc\((#loc\d+)\)", text)
            if line:
                return int(line.group(1))
            if not named:
                return None
            loc = named.group(1)
        return None

    def count(unit, loc):
        line = origin(loc)
        family = next((name for name, site in DOT_SITES.items() if site == line), None)
        counts[f"{family}_{unit}" if family else "other"] += 1

    counts = {"main_tc": 0, "main_fma": 0, "gather_tc": 0, "gather_fma": 0, "other": 0}
    # Register-result dots: tensor cores when the result is in an #mma encoding (mma.sync, wgmma).
    for match in re.finditer(r"= (?:tt\.dot|ttng\.warp_group_dot) [^\n]*-> tensor<[^>]*?(#\w+)> loc\((#loc\d+)\)",
                             ttgir):
        count("tc" if match.group(1).startswith("#mma") else "fma", match.group(2))
    # Blackwell's tcgen05 MMA (sm_100): operands in shared/tensor memory, accumulator in tensor memory.
    for match in re.finditer(r"^\s*(?:%\S+ = )?ttng\.tc_gen5_mma [^\n]* loc\((#loc\d+)\)$", ttgir, re.M):
        count("tc", match.group(1))
    return counts


def count_atomics(ttgir: str) -> int:
    """Atomic read-modify-writes in the kernel: none may exist, so that every result is
    reproducible bit for bit (a property the interpreter, being sequential, cannot show)."""
    return len(re.findall(r"\btt\.atomic_\w+", ttgir))


def _ptxas_stats(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spills.group(1)) if spills else None,
            "spill_loads": int(spills.group(2)) if spills else None}


def inspect_launch(launch, target: GPUTarget) -> dict:
    """Compile one launch and report what ptxas and the TTGIR say about it."""
    from triton import knobs

    log = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(log), knobs.nvidia.scope(), knobs.compilation.scope():
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
        compiled = compile_launch(launch, target)
    row = {"kernel": launch.name, "arch": target.arch, "num_warps": launch.meta.get("num_warps"),
           "num_stages": launch.meta.get("num_stages"),
           "blocks": {k: v for k, v in launch.meta.items() if k.startswith("BLOCK_")},
           "dot_precision": launch.meta.get("DOT_PRECISION"),
           "shared": compiled.metadata.shared, "shared_limit": SHARED_LIMIT.get(target.arch),
           "seconds": round(time.perf_counter() - started, 2),
           "wgmma": compiled.asm["ptx"].count("wgmma.mma_async"), "mma_sync": compiled.asm["ptx"].count("mma.sync"),
           "tcgen05": compiled.asm["ptx"].count("tcgen05.mma")}
    row.update(_ptxas_stats(log.getvalue()))
    row.update(classify_dots(compiled.asm["ttgir"]), atomics=count_atomics(compiled.asm["ttgir"]))
    return row


def inspect_native(launch) -> dict:
    """On a GPU: the kernel as Triton's own JIT compiles it for this device (``warmup``:
    compiled and loaded, not run), with the driver's register and local-memory counts."""
    started = time.perf_counter()
    compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.meta)
    compiled._init_handles()
    target = compiled.metadata.target
    return {"kernel": launch.name, "arch": target.arch, "num_warps": launch.meta.get("num_warps"),
            "num_stages": launch.meta.get("num_stages"),
            "blocks": {k: v for k, v in launch.meta.items() if k.startswith("BLOCK_")},
            "dot_precision": launch.meta.get("DOT_PRECISION"), "registers": compiled.n_regs,
            "spill_stores": compiled.n_spills, "spill_loads": None, "shared": compiled.metadata.shared,
            "shared_limit": SHARED_LIMIT.get(target.arch), "seconds": round(time.perf_counter() - started, 2),
            **classify_dots(compiled.asm["ttgir"]), "atomics": count_atomics(compiled.asm["ttgir"])}


def _inspect(launch, target: GPUTarget, native: bool) -> dict:
    try:
        return inspect_native(launch) if native else inspect_launch(launch, target)
    except Exception as exc:  # reported per launch; the check fails on it
        return {"kernel": launch.name, "arch": target.arch if target else None,
                "error": f"{type(exc).__name__}: {exc}"[:2000]}


def _inspect_job(job) -> dict:
    """Worker side of inspect_all: launch ``index`` of ``variant``."""
    variant, index = job
    return _inspect(launches_for(variant)[index], TARGETS[variant.arch], native=False)


def inspect_variant(variant: Variant, target: GPUTarget | None = None, native: bool = False) -> list[dict]:
    target = target or TARGETS.get(variant.arch)
    return [{**asdict(variant), **_inspect(launch, target, native), "variant": variant.label()}
            for launch in launches_for(variant, device="cuda" if native else "cpu")]


def inspect_all(variants, workers: int = 1, native: bool = False) -> list[dict]:
    """One row per launch of every variant. Ahead of time, each distinct specialisation is
    compiled once (``specialization_key``) and its row shared by the launches that have it."""
    if native:  # one process owns the GPU
        return [row for v in variants for row in inspect_variant(v, native=True)]
    plan, jobs = [], {}
    for variant in variants:
        for index, launch in enumerate(launches_for(variant)):
            key = specialization_key(launch, TARGETS[variant.arch])
            jobs.setdefault(key, (variant, index))
            plan.append((variant, key))
    if workers <= 1:
        results = dict(zip(jobs, map(_inspect_job, jobs.values())))
    else:
        # spawn, not fork: this process has run torch ops (its thread pools do not survive a fork)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = dict(zip(jobs, pool.map(_inspect_job, jobs.values(), chunksize=4)))
    return [{**asdict(variant), **results[key], "variant": variant.label()} for variant, key in plan]


def markdown(rows: list[dict]) -> str:
    head = ("| variant | kernel | tiles (M×N, warps, stages) | regs | spill st/ld (B) | shared (B) | "
            "main dots TC/FMA | gathers FMA | compile s |\n|---|---|---|---|---|---|---|---|---|\n")
    body = []
    for r in rows:
        if "error" in r:
            body.append(f"| {r['variant']} | {r['kernel']} | error: {r['error'][:80]} | | | | | | |")
            continue
        b = r["blocks"]
        cols = b.get("BLOCK_N", b.get("BLOCK_P", "-"))
        tiles = f"{b.get('BLOCK_M', '-')}×{cols}, {r['num_warps']}, {r['num_stages']}"
        body.append(f"| {r['variant']} | {r['kernel']} | {tiles} | {r['registers']} | "
                    f"{r['spill_stores']}/{r['spill_loads']} | {r['shared']} | {r['main_tc']}/{r['main_fma']} | "
                    f"{r['gather_fma']} | {r['seconds']} |")
    return head + "\n".join(body) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastdpl.kernels.compiled",
                                     description="Compile every launch the launcher can make, for a GPU that need "
                                                 "not be there, and report registers, spills, shared memory and "
                                                 "tensor-core dots.")
    parser.add_argument("--matrix", choices=sorted(MATRICES), default="ci",
                        help="ci: a covering subset; full: every precision x head dim x N x mask; smoke: one variant")
    parser.add_argument("--target", default=",".join(ARCHES),
                        help="comma-separated sm90, sm80, sm100; or 'native' for this machine's GPU")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--markdown", help="write a markdown table here")
    args = parser.parse_args(argv)
    if triton.knobs.runtime.interpret:
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    native = args.target == "native"
    if native:
        if not torch.cuda.is_available():
            parser.error("--target native needs a GPU")
        arches = (f"sm{torch.cuda.get_device_capability()[0]}{torch.cuda.get_device_capability()[1]}",)
    else:
        arches = tuple(a.strip() for a in args.target.split(","))
        unknown = [a for a in arches if a not in TARGETS]
        if unknown:
            parser.error(f"--target: unknown {unknown}; choose from {sorted(TARGETS)} or 'native'")
    variants = MATRICES[args.matrix](arches)
    rows = inspect_all(variants, args.workers, native)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows))
    bad = [r for r in rows if "error" in r or r.get("spill_stores")]
    print(f"{len(rows)} launches compiled for {', '.join(arches)}; {len(bad)} with errors or spills", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
