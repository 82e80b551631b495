"""Benchmark of test-time prompt tuning per test image (fastdpl bench tpt).

One test image = select the confident views, one AdamW step on the text context
(the TPT paper's setting, zero-shot CLIP), predict the original view. Providers,
timed interleaved in one run:

* ``fast``: fastdpl.TestTimePromptTuner on one image (image features once without
  a graph, truncated text tower, last-block rows only);
* ``fast_group4``: the same with 4 images tuned as one batch of independent prompts
  (time reported per image);
* ``literal``: the usual per-image implementation (fastdpl.literal.literal_tpt_predict):
  the views' image features in every forward, full untruncated text tower, plain autograd.

Reported: median ms per image, images/s, and literal / this.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fastdpl.adapters import adapt
from fastdpl.config import PromptConfig
from fastdpl.literal import literal_tpt_predict
from fastdpl.prompt import FastDPLPrompt
from fastdpl.tpt import TestTimePromptTuner
from .step import build_model, classnames
from .suite import Suite, add_ratios, run_suite, suite_main, table, time_calls

GROUP = 4


@dataclass(frozen=True)
class TPTShape:
    name: str
    model: str
    views: int
    classes: int


GPU_SHAPES = [TPTShape("b16-64v-100cls", "ViT-B-16", 64, 100), TPTShape("b16-64v-1000cls", "ViT-B-16", 64, 1000)]
CPU_SHAPES = [TPTShape("b32-16v-100cls", "ViT-B-32", 16, 100)]
SMOKE_SHAPES = [TPTShape("smoke", "tiny", 4, 5)]


def _blocks(model) -> dict:
    adapter = adapt(model)
    return {"image": len(adapter.image.blocks), "text": len(adapter.text.blocks)}


def providers(model, shape: TPTShape, impl: str):
    dpl = FastDPLPrompt(model, classnames(shape.classes), mode="fixed", impl=impl,
                        config=PromptConfig.zero_shot(_blocks(model)))
    tuner = TestTimePromptTuner(dpl, tune="context", keep_fraction=0.1)
    return {
        "fast": lambda views: tuner.predict(views[:1]),
        f"fast_group{GROUP}": tuner.predict,
        "literal": lambda views: literal_tpt_predict(tuner, views[0]),
    }


def make_calls(shape: TPTShape, device, dtype, impl) -> dict:
    """{provider: call(i)}: TPT on input set i (two random view sets rotate; the group provider takes 4 images)."""
    model = build_model(shape.model, device).to(dtype)
    size = adapt(model).image_size[0]
    gen = torch.Generator().manual_seed(0)
    view_sets = [torch.randn(GROUP, shape.views, 3, size, size, generator=gen).to(device, dtype) for _ in range(2)]
    return {name: functools.partial(lambda fn, i: fn(view_sets[i % 2]), fn)
            for name, fn in providers(model, shape, impl).items()}


def bench_shape(shape: TPTShape, device, dtype, impl, repeats, warmup):
    rows = time_calls(shape.name, make_calls(shape, device, dtype, impl), device, repeats, warmup,
                      per_call={f"fast_group{GROUP}": GROUP})
    add_ratios(rows, "literal", "literal_over_this", invert=True)
    for r in rows:
        r["images_per_s"] = 1000.0 / r["median_ms"] if "median_ms" in r else None
    return rows


def format_table(rows) -> str:
    return table(rows, [("shape", 16), ("provider", 12)],
                 [("ms/image", "median_ms", ".1f"), ("IQR ms", "iqr", ".1f"), ("images/s", "images_per_s", ".2f"),
                  ("peak MB", "peak_memory_mb", ".0f"), ("literal/this", "literal_over_this", ".2f")])


SUITE = Suite("tpt", GPU_SHAPES, CPU_SHAPES, SMOKE_SHAPES, bench_shape, format_table,
              lambda s: f"{s.model}, {s.views} views, {s.classes} classes, tuning the context",
              "literal_over_this", "speed-up over the literal per-image TPT (x)", repeats=(20, 7, 2))

run = functools.partial(run_suite, SUITE)  # run(device=..., smoke=..., out=...) -> result dict
main = functools.partial(suite_main, SUITE, description=__doc__.split("\n\n")[0])  # main(argv) -> exit code
