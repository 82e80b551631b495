"""The equivalence figures per backbone family (docs/backbones.md): FastDPLPrompt with zero-length
prompts against the model's own forward, and with prompts in both towers against the literal
per-candidate implementations of the tests (logits and the worst prompt/alpha gradient; the timm
towers also in float64), using the tests' own builders and literals.

    python scripts/equivalence_figures.py

Errors are max|x - ref| / max|ref| per tensor (tests/helpers.normalised_error).
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fastdpl import FastDPLPrompt, PromptConfig  # noqa: E402
from fastdpl.literal import literal_logits as open_clip_literal  # noqa: E402
from helpers import CLASSNAMES, normalised_error, tiny_clip  # noqa: E402


def logits_and_worst_grad(dpl, literal, images):
    """(logit error, worst gradient error) at random alpha and prompts, as the tests draw them."""
    gen = torch.Generator().manual_seed(3)
    params = dpl.arch_parameters() + dpl.prompt_parameters()
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen))
    labels = torch.arange(len(images)) % dpl.num_classes
    fast, ref = dpl(images), literal(images)
    grads = torch.autograd.grad(F.cross_entropy(fast, labels), params)
    ref_grads = torch.autograd.grad(F.cross_entropy(ref, labels), params)
    return normalised_error(fast, ref), max(normalised_error(g, r) for g, r in zip(grads, ref_grads))


def zero_prompt(model, blocks, tokenizer=None):
    return FastDPLPrompt(model, CLASSNAMES, mode="fixed", config=PromptConfig.zero_shot(blocks), tokenizer=tokenizer)


def open_clip_rows():
    from openclip_next import convert

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for label, model in (("open_clip MHA (tiny)", tiny_clip(seed=3)),
                         ("open_clip next Attention (tiny)", convert(tiny_clip(seed=3)))):
        dpl = zero_prompt(model, {"image": 3, "text": 3})
        with torch.no_grad():
            image, text, scale = model(images, dpl.class_tokens)[:3]
            zero = normalised_error(dpl(images), scale * image @ text.T)
        dpl = FastDPLPrompt(model, CLASSNAMES, candidate_lengths=(0, 1, 3), impl="eager")
        yield label, zero, logits_and_worst_grad(dpl, lambda x: open_clip_literal(dpl, x), images), None


def timm_rows():
    import test_open_clip_timm as timm_tests

    for (name, mode) in (("ViT-B-16-SigLIP", "search"), ("vit_medium_patch16_gap_256", "search"),
                         ("MobileCLIP-B", "fixed")):
        model = timm_tests.build(name)
        blocks = {"image": len(model.visual.trunk.blocks), "text": len(timm_tests._text(model).transformer.resblocks)}
        dpl = zero_prompt(model, blocks, timm_tests._tokenizer(model))
        images = timm_tests._images(model)
        with torch.no_grad():
            zero = normalised_error(dpl(images), timm_tests.own_logits(model, images, dpl.class_tokens))
        errors = []
        for dtype in (torch.float32, torch.float64):  # the test's set-up (depth 2, qk_norm, scale_norm in fixed)
            model = timm_tests._norms(timm_tests.build(name, depth=2, seed=2))
            tokenizer = timm_tests._tokenizer(model)
            if mode == "search":
                model.visual.trunk.blocks[1].attn.norm = torch.nn.Identity()
                dpl = FastDPLPrompt(model, CLASSNAMES, candidate_lengths=(0, 1, 3), impl="eager", tokenizer=tokenizer)
            else:
                dpl = FastDPLPrompt(model, CLASSNAMES, mode="fixed", impl="eager", tokenizer=tokenizer,
                                    config=PromptConfig({"image": (2, 3), "text": (3, 1)}))
            model.to(dtype), dpl.to(dtype)
            literal = lambda x: timm_tests.literal_logits(dpl, model, x, dpl.class_tokens)  # noqa: E731
            errors.append(logits_and_worst_grad(dpl, literal, timm_tests._images(model).to(dtype)))
        yield f"open_clip + timm, {name} ({mode})", zero, errors[0], errors[1]


def hf_rows():
    import test_hf_clip as clip_tests
    import test_hf_siglip as siglip_tests

    model = clip_tests.hf_clip()
    with torch.no_grad():
        own = model(input_ids=clip_tests._tokens(), pixel_values=clip_tests._images()).logits_per_image
        zero = normalised_error(zero_prompt(model, {"image": 3, "text": 3})(clip_tests._images()), own)
    model = clip_tests.hf_clip(seed=2)
    dpl = FastDPLPrompt(model, CLASSNAMES, candidate_lengths=(0, 2, 3), impl="eager")
    literal = lambda x: clip_tests.literal_logits(dpl, model, x, clip_tests._tokens())  # noqa: E731
    yield "transformers CLIP", zero, logits_and_worst_grad(dpl, literal, clip_tests._images()), None

    model, tokenizer = siglip_tests.siglip(), siglip_tests.tokenizer
    with torch.no_grad():
        own = model(input_ids=siglip_tests._tokens(), pixel_values=siglip_tests._images()).logits_per_image
        zero = normalised_error(zero_prompt(model, {"image": 3, "text": 3}, tokenizer)(siglip_tests._images()), own)
    model = siglip_tests.siglip(seed=2)
    dpl = FastDPLPrompt(model, CLASSNAMES, candidate_lengths=(0, 1, 3), impl="eager", tokenizer=tokenizer)
    literal = lambda x: siglip_tests.literal_logits(dpl, model, x, siglip_tests._tokens())  # noqa: E731
    yield "transformers SigLIP", zero, logits_and_worst_grad(dpl, literal, siglip_tests._images()), None


def main():
    print("| family | zero prompts vs own forward (fp32) | vs literal fp32: logits / worst grad | float64 |")
    print("| --- | --- | --- | --- |")
    for rows in (open_clip_rows(), timm_rows(), hf_rows()):
        for label, zero, fp32, fp64 in rows:
            wide = f"{fp64[0]:.1e} / {fp64[1]:.1e}" if fp64 else ""
            print(f"| {label} | {zero:.1e} | {fp32[0]:.1e} / {fp32[1]:.1e} | {wide} |", flush=True)


if __name__ == "__main__":
    main()
