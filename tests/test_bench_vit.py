"""fastdpl bench vit: its providers compute what their names say (else the ratios compare different
work) and its runner writes the ratios. Smoke shape, CPU, float64."""

import pytest
import torch

pytest.importorskip("timm")

from fastdpl.bench import vit  # noqa: E402
from fastdpl.config import PromptConfig  # noqa: E402
from fastdpl.vit import FastDPLViT  # noqa: E402

SHAPE = vit.SMOKE_SHAPES[0]


def _images(seed=1):
    m = SHAPE.model
    return torch.randn(3, 3, m.image, m.image, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _loss_and_grads(forward, params, images):
    labels = torch.tensor([0, 3, 7])
    loss = torch.nn.functional.cross_entropy(forward(images), labels)
    return loss.detach(), torch.autograd.grad(loss, params)


def _randomise(params, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_the_literal_supernet_is_the_search():
    found = vit.providers(SHAPE, "cpu", torch.float64, "eager", names=("search", "literal"))
    (search, params), (literal, same) = found["search"], found["literal"]
    assert same is params
    _randomise(params[:-2])  # prompts and alpha; the head keeps timm's start
    x = _images()
    ours, theirs = _loss_and_grads(search, params, x), _loss_and_grads(literal, params, x)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=0)
    for g, h in zip(ours[1], theirs[1]):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-13)


def test_the_single_path_is_vpt_deep_with_the_longest_candidate():
    """VPT's concatenation == FastDPLViT fixed at 10 tokens per block, with the same prompts."""
    (vpt, params), = vit.providers(SHAPE, "cpu", torch.float64, "eager", names=("single_path",)).values()
    length, depth = max(SHAPE.lengths), SHAPE.model.depth
    assert [tuple(p.shape) for p in vpt.prompts] == [(length, SHAPE.model.width)] * depth
    _randomise(list(vpt.prompts))
    fixed = FastDPLViT(SHAPE.model.build("cpu", torch.float64), mode="fixed", impl="eager",
                       config=PromptConfig({"image": (length,) * depth}, stacks=("image",))).double()
    with torch.no_grad():
        for b, p in enumerate(vpt.prompts):
            fixed.prompt("image", b, length).copy_(p)
    x = _images()
    ours = _loss_and_grads(fixed, fixed.prompt_parameters() + fixed.head_parameters(), x)
    theirs = _loss_and_grads(vpt, params, x)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-12, atol=0)
    for g, h in zip(ours[1], theirs[1]):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-13)


