"""CoOp and CoCoOp (fastdpl.methods) against open_clip's own forward and a literal per-image loop."""
import pytest
import torch
import torch.nn.functional as F

from fastdpl.literal import literal_context_logits
from fastdpl.methods import CoCoOpPrompt, CoOpPrompt
from helpers import CLASSNAMES, normalised_error, tiny_clip

TOL = 1e-5  # fp32, relative to the largest value


def _images(batch=3, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _randomize(module, seed=2, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in module.parameter_groups().values():
            for p in group:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def _grads(logits, module):
    params = [p for group in module.parameter_groups().values() for p in group]
    labels = torch.arange(logits.shape[0]) % logits.shape[1]
    return torch.autograd.grad(F.cross_entropy(logits, labels), params)


def _assert_match(module, images):
    fast, ref = module(images), literal_context_logits(module, images)
    assert normalised_error(fast, ref) < TOL
    for g, r in zip(_grads(fast, module), _grads(ref, module)):
        assert r.abs().max() > 0 and normalised_error(g, r) < TOL


def test_coop_initialised_from_words_is_zero_shot_clip():
    import open_clip

    model, images = tiny_clip(seed=5), _images()
    coop = CoOpPrompt(model, CLASSNAMES, ctx_init="a photo of a")
    assert coop.n_ctx == 4 and tuple(coop.ctx.shape) == (4, 48)
    with torch.no_grad():
        texts = open_clip.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES])
        zero_shot = model.logit_scale.exp() * F.normalize(model.encode_image(images), dim=-1) @ \
            F.normalize(model.encode_text(texts), dim=-1).T
        assert normalised_error(coop(images), zero_shot) < 2e-6


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("class_specific", [False, True], ids=["shared", "per_class"])
def test_coop_matches_the_literal_reference_with_gradients(position, class_specific):
    coop = CoOpPrompt(tiny_clip(seed=6), CLASSNAMES, n_ctx=5, class_specific=class_specific,
                      class_token_position=position, impl="eager", generator=torch.Generator().manual_seed(3))
    _assert_match(coop, _images())


@pytest.mark.parametrize("chunk", [None, 4], ids=["one_pass", "chunks_of_4"])
def test_cocoop_matches_the_literal_per_image_loop_with_gradients(chunk):
    cocoop = CoCoOpPrompt(tiny_clip(seed=7), CLASSNAMES, impl="eager", text_chunk_size=chunk,
                          generator=torch.Generator().manual_seed(4))
    _randomize(cocoop)
    _assert_match(cocoop, _images(batch=3, seed=8))


def test_cocoop_with_a_zero_meta_network_is_coop():
    model, images = tiny_clip(seed=8), _images()
    cocoop = CoCoOpPrompt(model, CLASSNAMES, n_ctx=3, ctx_init=None, generator=torch.Generator().manual_seed(1))
    coop = CoOpPrompt(model, CLASSNAMES, n_ctx=3)
    with torch.no_grad():
        cocoop.meta_net.linear2.weight.zero_()
        cocoop.meta_net.linear2.bias.zero_()
        coop.ctx.copy_(cocoop.ctx)
        assert normalised_error(cocoop(images), coop(images)) < 2e-6
        # (a constant shift of every dimension would vanish in ln_1: a random one does not)
        cocoop.meta_net.linear2.bias.copy_(torch.randn(48, generator=torch.Generator().manual_seed(0)))
        assert normalised_error(cocoop(images), coop(images)) > 1e-3  # the bias reaches the logits


def test_state_round_trip_rebuilds_and_refuses_mismatches():
    model = tiny_clip()
    for cls in (CoOpPrompt, CoCoOpPrompt):
        a = cls(model, CLASSNAMES, n_ctx=2, ctx_init=None, generator=torch.Generator().manual_seed(1))
        _randomize(a, seed=9)
        b = cls(model, CLASSNAMES, n_ctx=2, ctx_init=None, generator=torch.Generator().manual_seed(2))
        b.load_prompt_state_dict(a.prompt_state_dict())
        images = _images()
        with torch.no_grad():
            assert torch.equal(a(images), b(images))
        with pytest.raises(ValueError, match="settings mismatch"):
            cls(model, CLASSNAMES, n_ctx=3, ctx_init=None).load_prompt_state_dict(a.prompt_state_dict())
    per_class = CoOpPrompt(model, CLASSNAMES, n_ctx=2, class_specific=True)
    with pytest.raises(ValueError, match="class-specific contexts need the same classes"):
        CoOpPrompt(model, CLASSNAMES[:3], n_ctx=2, class_specific=True).load_prompt_state_dict(
            per_class.prompt_state_dict())
    with pytest.raises(ValueError, match="not a fastdpl context-prompt state"):
        per_class.load_prompt_state_dict({"format": "x"})


@pytest.mark.parametrize("kwargs,match", [
    (dict(class_token_position="start"), "class_token_position must be one of"),
    (dict(n_ctx=0), "n_ctx must be a positive int"),
    (dict(ctx_init=" "), "ctx_init must be words"),
    (dict(n_ctx=70), "does not fit the text tower's 77 positions"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoOpPrompt(tiny_clip(), CLASSNAMES, **kwargs)


def test_cocoop_refuses_class_specific_contexts_and_class_only_text():
    with pytest.raises(ValueError, match="class_specific is not supported"):
        CoCoOpPrompt(tiny_clip(), CLASSNAMES, class_specific=True)
    with pytest.raises(ValueError, match="depend on the image"):
        CoCoOpPrompt(tiny_clip(), CLASSNAMES).encode_text()


def test_builders_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    CoCoOpPrompt(tiny_clip(), CLASSNAMES, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)
