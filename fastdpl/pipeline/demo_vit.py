"""``fastdpl demo vit``: searched VPT-deep prompt lengths offline, on a timm ViT classifier.

The classifier is the built-in tiny CLIP's image tower converted to a timm VisionTransformer
(``timm:tiny``: models.vit_from_open_clip, the same features exactly) with a fresh head for the
ten classes of scikit-learn's bundled handwritten digits, 16 shots per class. The table: the head
alone on the frozen features (linear probe), VPT-deep with VPT's default 5 tokens in every block,
and DPL (search over 0, 1, 5, 10 tokens per block, then the argmax configuration trained fresh),
all with the same head, learning rates, schedule and epochs; then the alpha heatmap. About a
minute on 2 CPU cores.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..atomic import write_text_atomic
from .config import RunConfig, method_config

# Prompts learn at a far higher rate than the head (VPT's prompt learning rates reach tens):
# prompt tokens N(0, 0.02^2) barely move the keys and values at the head's 0.2.
DEMO_VIT_SETTINGS = dict(
    dataset="builtin:digits", model="timm:tiny", shots=16, seed=1, batch_size=16, val_batch_size=16,
    search_epochs=20, train_epochs=30, lr=1.0, head_lr=0.2, arch_lr=0.05, warmup_epochs=1, grad_clip=1.0,
    crop_scale=[0.6, 1.0], flip=False, eval_batch_size=200, workers=0, device="cpu", output="runs/demo-vit",
    resume=True)  # a second `fastdpl demo vit` picks up its finished checkpoints instead of refusing
UNIFORM = "uniform:5:4"  # VPT-deep's default: 5 tokens in every block (the tiny ViT has 4)


def demo_vit_config(**overrides) -> RunConfig:
    return method_config(**{**DEMO_VIT_SETTINGS, **overrides})


def run_demo_vit(cfg: RunConfig | None = None) -> dict:
    """Every method under cfg.output; returns {method: (per-block prompt lengths, top-1)} and prints the table."""
    from .stages import run_search, run_train

    cfg = cfg or demo_vit_config()
    out = Path(cfg.output)
    start = time.perf_counter()
    stage = lambda folder, **kw: dataclasses.replace(cfg, output=str(out / folder), **kw)  # noqa: E731
    results = {"linear probe (head only)": ("linear", run_train(stage("linear", method="linear"))),
               "VPT-deep, 5 tokens per block": ("uniform", run_train(stage("uniform", method=UNIFORM)))}
    run_search(stage("dpl"))
    results["DPL (searched)"] = ("dpl", run_train(stage("dpl")))
    table = {method: (trained_lengths(out / folder), result["top1"]) for method, (folder, result) in results.items()}
    lines = [f"builtin:digits, {cfg.shots} shots, tiny ViT (timm), test accuracy ({time.perf_counter() - start:.0f} s):",
             "| method | prompt tokens per block | total | top-1 % |", "| --- | --- | ---: | ---: |"]
    for method, (lengths, top1) in table.items():
        lines.append(f"| {method} | {' '.join(map(str, lengths))} | {sum(lengths)} | {100 * top1:.1f} |")
    lines.append(f"alpha heatmap: {out / 'dpl' / 'search' / 'alpha_heatmap.png'}")
    print("\n" + "\n".join(lines))
    write_text_atomic(out / "table.md", "\n".join(lines) + "\n")
    return table


def trained_lengths(run: Path) -> list:
    """Per-block prompt lengths of a run's train stage (its saved configuration)."""
    import torch

    state = torch.load(run / "train" / "prompts.pt", map_location="cpu", weights_only=False)
    return list(state["bank"]["settings"]["config"]["lengths"]["image"])
