"""Benchmark of a CoCoOp training step (fastdpl bench cocoop).

One step = forward and backward of the cross-entropy of a batch (the meta-network and the
context get gradients). CoCoOp's cost is its text tower: every image has its own C class texts.
Providers, timed interleaved in one run:

* ``fast``: fastdpl.methods.CoCoOpPrompt: the class-token embeddings looked up once per step,
  the B x C texts in one batched pass, truncated after the longest end-of-text token, the last
  block computing the end-of-text rows only;
* ``fast_chunked``: the same in checkpointed chunks of 256 texts (the memory setting for many
  classes);
* ``literal``: the reference implementation's loop (fastdpl.literal.literal_context_logits): per
  image, its C prompts through the full 77-position text transformer.

Reported: median ms per step, and literal / this.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdpl.adapters import adapt
from fastdpl.literal import literal_context_logits
from fastdpl.methods import CoCoOpPrompt
from .step import build_model, classnames
from .suite import Suite, add_ratios, run_suite, suite_main, table, time_calls

CHUNK = 256


@dataclass(frozen=True)
class CoCoOpShape:
    name: str
    model: str
    batch: int
    classes: int


GPU_SHAPES = [CoCoOpShape("b16-b1-100cls", "ViT-B-16", 1, 100), CoCoOpShape("b16-b4-100cls", "ViT-B-16", 4, 100),
              CoCoOpShape("b16-b1-1000cls", "ViT-B-16", 1, 1000)]
CPU_SHAPES = [CoCoOpShape("tiny-b2-100cls", "tiny", 2, 100), CoCoOpShape("tiny-b1-1000cls", "tiny", 1, 1000)]
SMOKE_SHAPES = [CoCoOpShape("smoke", "tiny", 2, 5)]


def make_calls(shape: CoCoOpShape, device, dtype, impl) -> dict:
    """{provider: call(i)}: one training step on image batch i (two batches rotate)."""
    model = build_model(shape.model, device).to(dtype)
    size = adapt(model).image_size[0]
    names = classnames(shape.classes)
    modules = {"fast": CoCoOpPrompt(model, names, impl=impl),
               "fast_chunked": CoCoOpPrompt(model, names, impl=impl, text_chunk_size=CHUNK)}
    modules["literal"] = modules["fast"]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(shape.batch, 3, size, size, generator=gen).to(device, dtype) for _ in range(2)]
    labels = torch.arange(shape.batch, device=device) % shape.classes

    def step(name, i):
        module = modules[name]
        logits = literal_context_logits(module, batches[i % 2]) if name == "literal" else module(batches[i % 2])
        params = module.parameter_groups()["prompt"]
        return torch.autograd.grad(F.cross_entropy(logits.float(), labels), params)
    return {name: functools.partial(step, name) for name in modules}


def bench_shape(shape: CoCoOpShape, device, dtype, impl, repeats, warmup):
    rows = time_calls(shape.name, make_calls(shape, device, dtype, impl), device, repeats, warmup)
    add_ratios(rows, "literal", "literal_over_this", invert=True)
    return rows


def format_table(rows) -> str:
    return table(rows, [("shape", 16), ("provider", 13)],
                 [("ms/step", "median_ms", ".1f"), ("IQR ms", "iqr", ".1f"), ("peak MB", "peak_memory_mb", ".0f"),
                  ("literal/this", "literal_over_this", ".2f")])


SUITE = Suite("cocoop", GPU_SHAPES, CPU_SHAPES, SMOKE_SHAPES, bench_shape, format_table,
              lambda s: f"{s.model}, batch {s.batch}, {s.classes} classes, CoCoOp training step",
              "literal_over_this", "speed-up over the literal per-image CoCoOp (x)", repeats=(20, 5, 2))

run = functools.partial(run_suite, SUITE)  # run(device=..., smoke=..., out=...) -> result dict
main = functools.partial(suite_main, SUITE, description=__doc__.split("\n\n")[0])  # main(argv) -> exit code
