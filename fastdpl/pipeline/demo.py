"""``fastdpl demo``: the whole DPL protocol offline, on the built-in tiny CLIP and real handwritten digits.

Zero-shot CLIP, a manual uniform deep-prompt baseline, DPL (search, then train the
derived configuration), each of those two also with PromptSRC's self-regularisation,
CoOp, CoCoOp, and test-time prompt tuning on zero-shot CLIP, CoOp and CoCoOp, on scikit-learn's bundled digits (16 shots per class); then
the accuracy table and the alpha heatmap. A few minutes on 2 CPU cores.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .config import RunConfig

DEMO_SETTINGS = dict(
    dataset="builtin:digits", model="tiny", pretrained=None, template="a photo of the number {}.", shots=16, seed=1,
    batch_size=8, val_batch_size=8, search_epochs=20, train_epochs=20, lr=0.01, arch_lr=0.02, warmup_epochs=1, grad_clip=1.0,
    crop_scale=[0.6, 1.0], flip=False, eval_batch_size=200, workers=0, device="cpu", output="runs/demo",
    ctx_init="a photo of the number", tpt_context="a photo of the number", tpt_views=16, tpt_group=16,
    resume=True)  # a second `fastdpl demo` picks up its finished checkpoints instead of refusing
BASELINE = "uniform:1:4"  # one prompt token in all 4 blocks of both towers: the manual deep-prompt baseline


def demo_config(**overrides) -> RunConfig:
    return RunConfig(**{**DEMO_SETTINGS, **overrides}).validate()


def run_demo(cfg: RunConfig | None = None) -> dict:
    """Run every method under cfg.output; returns {method: top-1} and prints the table."""
    from .regularizers import promptsrc_defaults
    from .stages import run_search, run_tpt, run_train, run_zeroshot

    cfg = cfg or demo_config()
    out = Path(cfg.output)
    start = time.perf_counter()
    stage = lambda **kw: dataclasses.replace(cfg, **kw)  # noqa: E731
    # PromptSRC's weights and its 20-epoch aggregation (the demo trains 20 epochs)
    src = dict(regularizer="promptsrc", **promptsrc_defaults({"train_epochs": cfg.train_epochs}))
    table = {"zero-shot CLIP": run_zeroshot(stage(output=str(out / "zeroshot")))["top1"]}
    table[f"deep prompts {BASELINE}"] = run_train(stage(output=str(out / "uniform"), method=BASELINE))["top1"]
    table[f"deep prompts {BASELINE} + PromptSRC"] = run_train(stage(output=str(out / "uniform-promptsrc"),
                                                                    method=BASELINE, **src))["top1"]
    run_search(stage(output=str(out / "dpl")))
    table["DPL (searched)"] = run_train(stage(output=str(out / "dpl")))["top1"]
    searched = str(out / "dpl" / "search" / "prompt_config.json")
    table["DPL + PromptSRC"] = run_train(stage(output=str(out / "dpl-promptsrc"), prompt_config=searched,
                                               **src))["top1"]
    for method, name in (("coop", "CoOp"), ("cocoop", "CoCoOp")):
        table[name] = run_train(stage(output=str(out / method), method=method))["top1"]
    # test-time prompt tuning: zero-shot CLIP's context, then the learned CoOp and CoCoOp contexts
    table["TPT (zero-shot CLIP)"] = run_tpt(stage(output=str(out / "zeroshot")))["top1"]
    for method, name in (("coop", "CoOp"), ("cocoop", "CoCoOp")):
        table[f"TPT + {name}"] = run_tpt(stage(output=str(out / method)),
                                         prompts=str(out / method / "train" / "prompts.pt"))["top1"]
    print(f"\nbuiltin:digits, {cfg.shots} shots, tiny CLIP, test accuracy ({time.perf_counter() - start:.0f} s):")
    print("| method | top-1 % |\n| --- | ---: |")
    for method, top1 in table.items():
        print(f"| {method} | {100 * top1:.1f} |")
    print(f"alpha heatmap: {out / 'dpl' / 'search' / 'alpha_heatmap.png'}")
    return table
