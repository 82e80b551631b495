"""open_clip's next attention class (open_clip main's Attention, written here as tests/openclip_next.py):
FastDPLPrompt gives the same logits and gradients as with nn.MultiheadAttention on the same weights,
applies its options exactly (against the literal supernet, which calls the module itself), and
refuses what it cannot run."""
import copy

import pytest
import torch

from fastdpl import FastDPLPrompt, PromptConfig
from fastdpl.literal import literal_logits
from fastdpl.adapters import UnsupportedModelError
from helpers import CLASSNAMES, normalised_error, tiny_clip
from openclip_next import convert

TOL = 1e-5


def _images(seed=1):
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _supernet(model, seed=2):
    dpl = FastDPLPrompt(model, CLASSNAMES, candidate_lengths=(0, 1, 3), impl="eager",
                        generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dpl.arch_parameters() + dpl.prompt_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return dpl


def _fixed(model, seed=2):
    config = PromptConfig({"image": (2, 0, 3), "text": (1, 4, 0)})
    dpl = FastDPLPrompt(model, CLASSNAMES, mode="fixed", config=config, impl="eager")
    with torch.no_grad():
        for p in dpl.prompt_parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return dpl


def _logits_and_grads(dpl, fn):
    logits = fn(_images())
    params = dpl.arch_parameters() + dpl.prompt_parameters()
    labels = torch.arange(3) % logits.shape[1]
    return logits.detach(), torch.autograd.grad(torch.nn.functional.cross_entropy(logits, labels), params)


def test_the_next_attention_class_gives_the_same_logits_and_gradients_as_multihead_attention():
    mha = tiny_clip(seed=3)
    nxt = convert(copy.deepcopy(mha))
    with torch.no_grad():  # the stand-in is the same function as nn.MultiheadAttention
        assert normalised_error(nxt.encode_image(_images()), mha.encode_image(_images())) < 1e-6
    a, b = _supernet(mha), _supernet(nxt)
    (la, ga), (lb, gb) = _logits_and_grads(a, a), _logits_and_grads(b, b)
    assert normalised_error(lb, la) < 1e-6
    for x, y in zip(gb, ga):
        assert y.abs().max() > 0 and normalised_error(x, y) < 1e-6


@pytest.mark.parametrize("option", ["qk_norm", "scaled_cosine", "scale_heads", "inner_norm"])
def test_each_option_of_the_next_attention_is_applied_exactly(option):
    model = convert(tiny_clip(seed=4), **{option: True})
    zero = FastDPLPrompt(model, CLASSNAMES, mode="fixed", config=PromptConfig.zero_shot({"image": 3, "text": 3}),
                         template="a photo of a {}.")
    import open_clip

    with torch.no_grad():  # no prompts: the model's own forward
        texts = open_clip.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES])
        assert normalised_error(zero.encode_image(_images()), model.encode_image(_images())) < TOL
        assert normalised_error(zero.encode_text(), model.encode_text(texts)) < TOL
        plain = convert(tiny_clip(seed=4))
        assert normalised_error(model.encode_image(_images()), plain.encode_image(_images())) > 1e-3  # not vacuous
    if option == "inner_norm":  # a LayerNorm after the mixture is not the mixture of LayerNorms
        with pytest.raises(UnsupportedModelError, match="inner_norm .* cannot be searched"):
            _supernet(model)
        dpl = _fixed(model)
    else:
        dpl = _supernet(model)
    (fast, grads), (ref, ref_grads) = _logits_and_grads(dpl, dpl), _logits_and_grads(dpl, lambda x: literal_logits(
        dpl, x))
    assert normalised_error(fast, ref) < 1e-4
    for g, r in zip(grads, ref_grads):
        assert r.abs().max() > 0 and normalised_error(g, r) < 1e-4


def test_separate_query_key_value_projections_are_refused_by_name():
    model = convert(tiny_clip(), separate_kv_dims=True)
    with pytest.raises(UnsupportedModelError, match="separate q/k/v projections"):
        FastDPLPrompt(model, CLASSNAMES)
