"""Benchmark of one prompted transformer block, forward + backward (fastdpl bench block).

The block-level view of the supernet claim: one open_clip residual attention block
(ViT-B-16's image block: width 768, 12 heads, N = 197; its text block: width 512,
8 heads, N = 77, causal) with random weights. Providers, timed interleaved:

* ``search``: the softmax(alpha) mixture of candidate lengths 0..6 through the fused op;
* ``single_path``: one prompt of the largest length (a single prompted block);
* ``literal``: the authors'-style block, one full attention per candidate (fastdpl.literal);
* ``plain``: the block without prompts (the floor).

Gradients: the block input, every prompt and alpha (where the provider has them).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fastdpl.literal import _literal_block
from fastdpl.adapters import project_prompts, prompted_block
from .suite import Suite, add_ratios, run_suite, suite_main, table, time_calls


@dataclass(frozen=True)
class BlockShape:
    name: str
    batch: int
    n: int
    width: int
    heads: int
    causal: bool
    lengths: tuple = tuple(range(7))


GPU_SHAPES = [BlockShape("image-b32", 32, 197, 768, 12, False), BlockShape("image-b128", 128, 197, 768, 12, False),
              BlockShape("text-100cls", 100, 77, 512, 8, True), BlockShape("text-1000cls-n20", 1000, 20, 512, 8, True)]
CPU_SHAPES = [BlockShape("image-b8", 8, 197, 768, 12, False), BlockShape("text-32cls", 32, 77, 512, 8, True)]
SMOKE_SHAPES = [BlockShape("smoke", 2, 9, 64, 4, True, (0, 1, 3))]


def _block(shape: BlockShape, device, dtype):
    from open_clip.transformer import ResidualAttentionBlock

    with torch.random.fork_rng(devices=[]):  # random weights from seed 0; the caller's RNG stays as it was
        torch.manual_seed(0)
        block = ResidualAttentionBlock(shape.width, shape.heads, batch_first=True)
    return block.to(device, dtype).requires_grad_(False)


def providers(shape: BlockShape, device, dtype, impl: str) -> dict:
    """{provider: fn(x) -> gradients}; prompts and alpha are leaves of each provider's own."""
    block = _block(shape, device, dtype)
    g = torch.Generator().manual_seed(1)
    lengths, longest = shape.lengths, max(shape.lengths)
    prompts = [0.02 * torch.randn(n, shape.width, generator=g) for n in lengths]
    mixture = torch.cat(prompts).to(device, dtype).requires_grad_()
    single = (0.02 * torch.randn(longest, shape.width, generator=g)).to(device, dtype).requires_grad_()
    alpha = (1e-3 * torch.randn(len(lengths), generator=g)).to(device, dtype).requires_grad_()
    each = [p.to(device, dtype).requires_grad_() for p in prompts]
    causal_mask = None
    if shape.causal:
        causal_mask = torch.full((shape.n, shape.n), float("-inf"), device=device, dtype=dtype).triu(1)

    def grads(out, leaves):
        return torch.autograd.grad(out.float().square().mean(), leaves)

    def search(x):
        kv = project_prompts(block, mixture)
        return grads(prompted_block(block, x, kv, lengths, torch.softmax(alpha, 0), shape.causal, impl),
                     [x, mixture, alpha])

    def single_path(x):
        kv = project_prompts(block, single)
        one = torch.ones(1, device=device, dtype=dtype)
        return grads(prompted_block(block, x, kv, (longest,), one, shape.causal, impl), [x, single])

    def literal(x):
        weights = torch.softmax(alpha, 0)
        candidates = [(weights[c], p if n > 0 else None) for c, (n, p) in enumerate(zip(lengths, each))]
        leaves = [x, alpha] + [p for n, p in zip(lengths, each) if n > 0]
        return grads(_literal_block(block, x, candidates, causal_mask), leaves)

    def plain(x):
        return grads(prompted_block(block, x, None, None, None, shape.causal, impl), [x])

    return {"search": search, "single_path": single_path, "literal": literal, "plain": plain}


def make_calls(shape: BlockShape, device, dtype, impl) -> dict:
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(shape.batch, shape.n, shape.width, generator=g).to(device, dtype).requires_grad_()
              for _ in range(2)]
    return {name: functools.partial(lambda fn, i: fn(inputs[i % 2]), fn)
            for name, fn in providers(shape, device, dtype, impl).items()}


def bench_shape(shape: BlockShape, device, dtype, impl, repeats, warmup):
    rows = time_calls(shape.name, make_calls(shape, device, dtype, impl), device, repeats, warmup)
    add_ratios(rows, "single_path", "vs_single_path")
    add_ratios(rows, "literal", "literal_over_this", invert=True)
    return rows


def format_table(rows) -> str:
    return table(rows, [("shape", 18), ("provider", 12)],
                 [("median ms", "median_ms", ".2f"), ("IQR ms", "iqr", ".2f"), ("peak MB", "peak_memory_mb", ".0f"),
                  ("x single", "vs_single_path", ".2f"), ("literal/this", "literal_over_this", ".2f")])


SUITE = Suite("block", GPU_SHAPES, CPU_SHAPES, SMOKE_SHAPES, bench_shape, format_table,
              lambda s: f"B={s.batch} N={s.n} width={s.width} heads={s.heads} causal={s.causal} "
                        f"lengths={list(s.lengths)}",
              "vs_single_path", "time / single-path block (x)", repeats=(30, 7, 2), gpu_dtype=torch.bfloat16)
run = functools.partial(run_suite, SUITE)  # run(device=..., smoke=..., out=...) -> result dict
main = functools.partial(suite_main, SUITE, description=__doc__.split("\n\n")[0])  # main(argv) -> exit code
