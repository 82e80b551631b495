"""Benchmark of one step of DPL's VPT-deep length search on a timm ViT classifier (fastdpl bench vit).

A step is the classifier's cross-entropy on a batch of images and random labels and its backward
to the trainable tensors (the prompts, the head, and alpha in search). No optimizer step: its
update costs every provider the same. The model is timm's VisionTransformer with random weights
(no download), frozen. Providers, timed interleaved in one run:

* ``search``: FastDPLViT(model, mode="search") over {0, 1, 5, 10} tokens per block (the fused op);
* ``single_path``: VPT-deep with the longest candidate (10) in every block, as VPT runs it: the
  prompt tokens concatenated to the sequence and timm's own blocks run on the longer sequence,
  the prompt rows dropped after each block;
* ``literal``: the supernet as the authors built CLIP's: each block's timm attention run once per
  candidate on [x ; P_c] (the search's own prompts and alpha), the real rows mixed by softmax(alpha),
  then the block's residuals and MLP.

Reported: median and IQR per step, peak CUDA memory (none on a CPU), and the ratios search /
single_path (``vs_single_path``, ``memory_vs_single_path``) and literal / this (``literal_over_this``).
"""
from __future__ import annotations

import argparse
import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdpl.vit import STACK, VIT_LENGTHS, FastDPLViT
from .suite import (
    STEP_COLUMNS, Suite, add_step_arguments, provider_names, release, run_step_suite, run_suite, step_ratios, table,
    time_calls,
)
from .timing import add_common_arguments

PROVIDERS = ("search", "single_path", "literal")


@dataclass(frozen=True)
class ViT:
    """A timm VisionTransformer classifier's dimensions."""
    image: int
    patch: int
    width: int
    depth: int
    heads: int
    classes: int = 100

    def build(self, device, dtype) -> nn.Module:
        """Random weights seeded 0 (the caller's RNG untouched), frozen, in eval mode."""
        from timm.models.vision_transformer import VisionTransformer

        device = torch.device(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(0)
            model = VisionTransformer(img_size=self.image, patch_size=self.patch, embed_dim=self.width,
                                      depth=self.depth, num_heads=self.heads, num_classes=self.classes)
        return model.to(dtype).eval().requires_grad_(False)


@dataclass(frozen=True)
class ViTShape:
    name: str
    model: ViT
    batch: int
    lengths: tuple = VIT_LENGTHS


VIT_B16 = ViT(224, 16, 768, 12, 12)  # ViT-B/16 at 224 px: 197 tokens, 12 heads of 64
GPU_SHAPES = [ViTShape("vit-b16-b32", VIT_B16, 32), ViTShape("vit-b16-b128", VIT_B16, 128)]
CPU_SHAPES = [ViTShape("vit-cpu-b8", ViT(224, 16, 192, 4, 3), 8)]  # ViT-Ti/16's width, 4 blocks
SMOKE_SHAPES = [ViTShape("vit-smoke", ViT(32, 8, 48, 2, 3, classes=10), 2)]


class VPTDeep(nn.Module):
    """VPT-deep as VPT runs it: ``length`` learned tokens per block concatenated to the sequence,
    timm's whole block on [x ; P_l], the prompt rows dropped after it; head trained."""

    def __init__(self, model: nn.Module, length: int):
        super().__init__()
        width = model.embed_dim
        generator = torch.Generator().manual_seed(0)
        param = next(model.parameters())
        self.prompts = nn.ParameterList(
            nn.Parameter((0.02 * torch.randn(length, width, generator=generator)).to(param.device, param.dtype))
            for _ in model.blocks)
        object.__setattr__(self, "model", model)  # not a submodule: its state is the prompts
        for p in model.get_classifier().parameters():
            p.requires_grad_(True)

    def forward(self, images):
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        n = x.shape[1]
        for block, prompt in zip(m.blocks, self.prompts):
            x = block(torch.cat([x, prompt.expand(x.shape[0], -1, -1)], 1))[:, :n]
        return m.forward_head(m.norm(x))


class LiteralSupernet(nn.Module):
    """The per-candidate supernet over the search's own prompts and alpha (its bank)."""

    def __init__(self, model: nn.Module, search: FastDPLViT):
        super().__init__()
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "search", search)

    def forward(self, images):
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        n = x.shape[1]
        for b, block in enumerate(m.blocks):
            prompts, lengths, weights = self.search.bank.block_prompts(STACK, b, x.dtype)
            mixed, start = 0, 0
            for weight, length in zip(weights, lengths):
                seq = torch.cat([x, prompts[start:start + length].expand(x.shape[0], -1, -1)], 1)
                mixed, start = mixed + weight * block.attn(block.norm1(seq))[:, :n], start + length
            x = x + block.drop_path1(block.ls1(mixed))
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return m.forward_head(m.norm(x))


def providers(shape: ViTShape, device, dtype, impl, names=PROVIDERS) -> dict:
    """{provider: (forward, trainable tensors)}: the single path over its own copy of the frozen
    model; the literal over the search's own model, prompts, alpha and head (it changes nothing)."""
    base = shape.model.build(device, dtype)
    found = {}
    if "single_path" in names:
        vpt = VPTDeep(copy.deepcopy(base), max(shape.lengths))
        found["single_path"] = (vpt, list(vpt.prompts) + list(vpt.model.get_classifier().parameters()))
    search = FastDPLViT(base, candidate_lengths=shape.lengths, impl=impl).to(dtype)
    params = search.prompt_parameters() + search.arch_parameters() + search.head_parameters()
    if "search" in names:
        found["search"] = (search, params)
    if "literal" in names:
        found["literal"] = (LiteralSupernet(base, search), params)
    return {n: found[n] for n in PROVIDERS if n in found}


def _step(forward, params, labels):
    def step(images):
        loss = F.cross_entropy(forward(images).float(), labels)
        return torch.autograd.grad(loss, params)
    return step


def make_calls(shape: ViTShape, device, dtype, impl, names=PROVIDERS) -> dict:
    gen = torch.Generator().manual_seed(0)
    m = shape.model
    batches = [torch.randn(shape.batch, 3, m.image, m.image, generator=gen).to(device, dtype) for _ in range(2)]
    labels = torch.randint(0, m.classes, (shape.batch,), generator=gen).to(device)
    return {name: functools.partial(lambda step, i: step(batches[i % len(batches)]), _step(*pair, labels))
            for name, pair in providers(shape, device, dtype, impl, names).items()}


def bench_shape(shape: ViTShape, device, dtype, impl, repeats, warmup, names=PROVIDERS):
    rows = time_calls(shape.name, make_calls(shape, device, dtype, impl, names), device, repeats, warmup)
    for r in rows:
        r["peer"] = {"search": f"fastdpl {impl}", "single_path": "VPT-deep concat", "literal": "per-candidate"}[
            r["provider"]]
    step_ratios(rows)
    release(device)
    return rows


def format_table(rows) -> str:
    return table(rows, [("shape", 13), ("provider", 11), ("peer", 15)], STEP_COLUMNS)


def describe(shape: ViTShape) -> str:
    m = shape.model
    tokens = (m.image // m.patch) ** 2 + 1
    return (f"timm VisionTransformer {m.depth} blocks, width {m.width}, {m.heads} heads, {m.image} px / patch "
            f"{m.patch} ({tokens} tokens), {m.classes} classes; batch {shape.batch}, lengths {list(shape.lengths)}")


SUITE = Suite("vit", GPU_SHAPES, CPU_SHAPES, SMOKE_SHAPES, bench_shape, format_table, describe, "vs_single_path",
              "time / single-path step (x)", repeats=(10, 5, 2), gpu_dtype=torch.bfloat16)

run = functools.partial(run_suite, SUITE)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastdpl bench vit", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_out="bench-out/vit.json")
    add_step_arguments(parser, PROVIDERS)
    args = parser.parse_args(argv)
    run_step_suite(SUITE, parser, args, names=provider_names(parser, args.providers, PROVIDERS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
