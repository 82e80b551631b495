"""Benchmark of mixture_prefix_attention against its peers (fastdpl bench op).

For each shape (the ViT-B/16 image tower and the text tower of DPL's supernet,
and a Llama-3.2-1B-like decoder layer with grouped-query attention) and each
provider it times the forward and the forward+backward, interleaved, and
reports median / interquartile range, peak memory (CUDA), TFLOP/s, and the
ratios to the reference loop and to the single-path floor. Results go to a JSON
file (with device, versions, commit and time) and a printed table.

FLOP count (the work of the problem, the same for every provider, so TFLOP/s
compare): a single attention over the N original keys plus all P = sum(lengths)
prompt keys, two matmuls of 2*N*keys*D each, counted over the H query heads (grouped-query
attention shares keys between heads, not score work),

    forward  = 4 * B * H * N * (N_vis + P) * D,   N_vis = N, or (N + 1) / 2 if causal
    fwd+bwd  = 3.5 * forward  (the backward runs five such matmuls to the forward's two)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fastdpl.ops import mixture_prefix_attention, triton_available, triton_interpreted
from . import peers
from .suite import Suite, run_suite, suite_main, table
from .timing import peak_memory_mb, summarize, time_interleaved


@dataclass(frozen=True)
class OpShape:
    name: str
    batch: int
    heads: int
    n: int
    head_dim: int
    lengths: tuple
    causal: bool
    kv_heads: int | None = None  # key/value heads (grouped-query attention); None: one per query head

    def __post_init__(self):
        # Filled in so that the recorded shape (asdict in the JSON) always states it.
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")

    def forward_flops(self) -> float:
        visible = (self.n + 1) / 2 if self.causal else self.n
        return 4.0 * self.batch * self.heads * self.n * (visible + sum(self.lengths)) * self.head_dim


DPL_LENGTHS = tuple(range(7))
# A prefix-tuned decoder layer shaped like Llama-3.2-1B (32 query heads, 8 key/value heads, head
# dim 64), searching the prefix length among these. Its target: fwd+bwd at most LM_TARGET x one SDPA
# over N + max(LM_LENGTHS) keys (the single prefix prefix tuning runs today; "x single" in the table).
LM_LENGTHS = (0, 4, 8, 16, 32, 64)
LM_TARGET = 1.15


def lm_shape(name: str, batch: int, n: int) -> OpShape:
    return OpShape(name, batch, 32, n, 64, LM_LENGTHS, True, kv_heads=8)


GPU_SHAPES = [
    OpShape("image-b32", 32, 12, 197, 64, DPL_LENGTHS, False),
    OpShape("image-b128", 128, 12, 197, 64, DPL_LENGTHS, False),
    OpShape("text-100cls-n77", 100, 8, 77, 64, DPL_LENGTHS, True),
    OpShape("text-100cls-n20", 100, 8, 20, 64, DPL_LENGTHS, True),
    OpShape("text-1000cls-n77", 1000, 8, 77, 64, DPL_LENGTHS, True),
    OpShape("text-1000cls-n20", 1000, 8, 20, 64, DPL_LENGTHS, True),
    lm_shape("lm-1b-n512", 4, 512),
    lm_shape("lm-1b-n2048", 4, 2048),
]
# Where LM_TARGET applies (row field "vs_single_path", provider "triton", mode "fwd+bwd").
LM_TARGET_SHAPES = tuple(s.name for s in GPU_SHAPES if s.name.startswith("lm-"))
# The CPU runs the same towers at a reduced batch, the decoder layer at batch 1 and N <= 1024: at
# N = 2048 one reference fwd+bwd alone takes ~26 s and 8 GB on two cores.
CPU_SHAPES = [
    OpShape("image-b8", 8, 12, 197, 64, DPL_LENGTHS, False),
    OpShape("text-32cls-n77", 32, 8, 77, 64, DPL_LENGTHS, True),
    OpShape("text-32cls-n20", 32, 8, 20, 64, DPL_LENGTHS, True),
    lm_shape("lm-1b-b1-n512", 1, 512),
    lm_shape("lm-1b-b1-n1024", 1, 1024),
]
SMOKE_SHAPES = [
    OpShape("image-smoke", 1, 2, 33, 16, (0, 1, 2, 3), False),
    OpShape("text-smoke", 2, 2, 9, 16, (0, 1, 2, 3), True),
    OpShape("lm-smoke", 1, 4, 16, 16, (0, 1, 2, 4), True, kv_heads=2),  # 2 kv heads: h // group, not h % H_kv
]


def providers(device: torch.device, shape: OpShape) -> dict:
    """Name -> callable with the op's signature, for what runs on this device."""
    found = {}
    for impl in ("reference", "eager", "triton"):
        if impl == "triton" and not (triton_available() and (device.type == "cuda" or triton_interpreted())):
            continue
        found[impl] = functools.partial(mixture_prefix_attention, impl=impl)
    found["lse_merge_math"] = functools.partial(peers.lse_merge, x_backend="math")
    if device.type == "cuda":
        found["lse_merge_xformers"] = functools.partial(peers.lse_merge, x_backend="xformers")
        found["lse_merge_flex"] = functools.partial(peers.lse_merge, x_backend="flex")
    found["sdpa_n+max"] = functools.partial(peers.sdpa_single_path, n_prompt=max(shape.lengths))
    found["sdpa_n+sum"] = functools.partial(peers.sdpa_single_path, n_prompt=sum(shape.lengths))
    if shape.kv_heads < shape.heads:  # the floor again, with SDPA's own grouped-query path instead of repeat_kv
        found["sdpa_n+max_gqa"] = functools.partial(peers.sdpa_single_path, n_prompt=max(shape.lengths),
                                                    enable_gqa=True)
    if device.type == "cuda":  # each SDPA backend over N + sum(lengths) keys; those that cannot run drop out
        for backend in ("flash", "cudnn", "efficient"):
            found[f"sdpa_n+sum_{backend}"] = functools.partial(peers.sdpa_single_path, n_prompt=sum(shape.lengths),
                                                               backend=backend)
    return found


def make_input_sets(shape: OpShape, dtype, device, count: int, seed: int = 0):
    """``count`` independent random input sets (leaf tensors needing grads) and output grads."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sets = []
    for _ in range(count):
        def randn(*size):
            return torch.randn(*size, generator=gen).to(device=device, dtype=dtype).requires_grad_()

        q = randn(shape.batch, shape.heads, shape.n, shape.head_dim)
        kv = [randn(shape.batch, shape.kv_heads, shape.n, shape.head_dim) for _ in range(2)]
        prompts = [randn(shape.kv_heads, sum(shape.lengths), shape.head_dim) for _ in range(2)]
        logits = torch.randn(len(shape.lengths), generator=gen).to(device)
        weights = torch.softmax(logits, 0).requires_grad_()
        grad_out = torch.randn(shape.batch, shape.heads, shape.n, shape.head_dim, generator=gen)
        sets.append(((q, *kv, *prompts, weights), grad_out.to(device=device, dtype=dtype)))
    return sets


def _call(fn, inputs, shape, backward):
    tensors, grad_out = inputs
    q, k, v, pk, pv, w = tensors
    if not backward:
        with torch.no_grad():
            return fn(q, k, v, pk, pv, shape.lengths, w, shape.causal)
    out = fn(q, k, v, pk, pv, shape.lengths, w, shape.causal)
    return torch.autograd.grad(out, tensors, grad_out, allow_unused=True)


def bench_shape(shape: OpShape, dtype, device, repeats: int, warmup: int, input_sets: int = 3):
    """All providers on one shape: a list of result rows."""
    sets = make_input_sets(shape, dtype, device, input_sets)
    rows = []
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        calls, errors = {}, {}
        for name, fn in providers(device, shape).items():
            call = functools.partial(lambda fn, backward, i: _call(fn, sets[i % len(sets)], shape, backward),
                                     fn, backward)
            try:
                call(0)  # also the first warm-up: drop providers that cannot run here
            except Exception as exc:  # noqa: BLE001 - report and go on with the others
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                continue
            calls[name] = call
        samples = time_interleaved(calls, device, repeats, warmup)
        flops = shape.forward_flops() * (3.5 if backward else 1.0)
        for name, times in samples.items():
            stats = summarize(times)
            rows.append(dict(shape=shape.name, mode=mode, provider=name, **stats,
                             peak_memory_mb=peak_memory_mb(lambda: calls[name](0), device),
                             tflops=flops / (stats["median_ms"] * 1e-3) / 1e12))
        rows += [dict(shape=shape.name, mode=mode, provider=name, error=err) for name, err in errors.items()]
    _add_ratios(rows)
    return rows


def _add_ratios(rows):
    """Per shape and mode: time / the single-path floor (SDPA over N + max keys: the language-model
    shapes' target ratio), time / the fastest SDPA backend over N + sum(lengths) keys (the CLIP
    shapes' target ratio), and reference time / time."""
    timed = {(r["shape"], r["mode"], r["provider"]): r["median_ms"] for r in rows if "median_ms" in r}
    for r in rows:
        if "median_ms" not in r:
            continue
        key = (r["shape"], r["mode"])
        floor = timed.get((*key, "sdpa_n+max"))
        sdpa_sum = min((t for (s, m, p), t in timed.items() if (s, m) == key and p.startswith("sdpa_n+sum")),
                       default=None)
        reference = timed.get((*key, "reference"))
        r["vs_single_path"] = r["median_ms"] / floor if floor else None
        r["vs_sdpa_sum"] = r["median_ms"] / sdpa_sum if sdpa_sum else None
        r["speedup_vs_reference"] = reference / r["median_ms"] if reference else None


def format_table(rows) -> str:
    return table(rows, [("shape", 18), ("mode", 8), ("provider", 20)],
                 [("median ms", "median_ms", ".3f"), ("IQR ms", "iqr", ".3f"), ("peak MB", "peak_memory_mb", ".0f"),
                  ("TFLOP/s", "tflops", ".3f"), ("x single", "vs_single_path", ".2f"),
                  ("x sdpa+sum", "vs_sdpa_sum", ".2f"),
                  ("ref/this", "speedup_vs_reference", ".2f")])


SUITE = Suite("op", GPU_SHAPES, CPU_SHAPES, SMOKE_SHAPES,
              lambda shape, device, dtype, impl, repeats, warmup: bench_shape(shape, dtype, device, repeats, warmup),
              format_table,
              lambda s: f"B={s.batch} H={s.heads} H_kv={s.kv_heads} N={s.n} D={s.head_dim} lengths={list(s.lengths)} "
                        f"causal={s.causal}",
              "vs_single_path", "time / one SDPA over N + max(lengths) keys (x)", repeats=(30, 7, 2),
              gpu_dtype=torch.bfloat16, warmup=2)

run = functools.partial(run_suite, SUITE)  # run(device=..., smoke=..., out=...) -> result dict
main = functools.partial(suite_main, SUITE, description=__doc__.split("\n\n")[0])  # main(argv) -> exit code
