"""FastDPLViT: searched VPT-deep prompt lengths on timm ViT classifiers, against independent
references written here on timm's own modules: timm's forward (no prompts), a literal VPT-deep
forward (prompt tokens appended after norm_pre, the blocks run on [x ; P_l], the prompt rows
dropped after every block, the head on the pooled output) and a literal per-candidate supernet,
in float64 with gradients, for class-token, average and attention-pool heads."""
import pytest
import torch

timm = pytest.importorskip("timm")

from fastdpl.adapters.base import UnsupportedModelError  # noqa: E402
from fastdpl.config import PromptConfig  # noqa: E402
from fastdpl.vit import FastDPLViT  # noqa: E402

POOLS = {"token": dict(global_pool="token"), "avg": dict(global_pool="avg", class_token=False),
         "map": dict(global_pool="map")}


def tiny_vit(pool="token", depth=3, **kw):
    torch.manual_seed(0)
    args = dict(img_size=12, patch_size=4, embed_dim=24, depth=depth, num_heads=3, num_classes=5, qkv_bias=True,
                init_values=0.5, **POOLS[pool])
    model = timm.models.vision_transformer.VisionTransformer(**{**args, **kw}).eval()
    with torch.no_grad():  # timm initialises some parts to zero; random values exercise every term
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def images(batch=3, size=12, dtype=torch.float32, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def randomize(dpl, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dpl.prompt_parameters() + dpl.arch_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def literal_vit(dpl, x_images):
    """VPT-deep / the supernet written literally on timm's modules: each candidate runs timm's own
    Attention on [x ; P_c] (the block's norm1 on both), its real rows are mixed by softmax(alpha),
    then timm's residuals and MLP; timm's final norm and head on the real rows."""
    m = dpl.model
    x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x_images))))
    n = x.shape[1]
    for b, block in enumerate(m.blocks):
        lengths = dpl.bank.lengths.get("image", [(0,)] * len(m.blocks))[b]
        weights = torch.softmax(dpl.arch_logits["image"][b], 0) if dpl.mode == "search" else [1.0]
        mixed = 0
        for w, length in zip(weights, lengths):
            seq = x if length == 0 else torch.cat([x, dpl.prompt("image", b, length).expand(x.shape[0], -1, -1)], 1)
            mixed = mixed + w * block.attn(block.norm1(seq))[:, :n]
        x = x + block.drop_path1(block.ls1(mixed))
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return m.forward_head(m.norm(x))


def literal_vpt_deep(model, prompts, x_images):
    """VPT-deep as its authors run it: prompts inserted after the embeddings, the whole block on
    the longer sequence, the prompt rows replaced by the next layer's (dropped after the last)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x_images))))
    n = x.shape[1]
    for block, prompt in zip(model.blocks, prompts):
        seq = x if prompt is None else torch.cat([x, prompt.expand(x.shape[0], -1, -1)], 1)
        x = block(seq)[:, :n]
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("pool", sorted(POOLS))
def test_no_prompts_is_timms_own_forward(pool):
    model = tiny_vit(pool)
    dpl = FastDPLViT(model, mode="fixed", config=PromptConfig({"image": (0, 0, 0)}, stacks=("image",)))
    x = images()
    torch.testing.assert_close(dpl(x), model(x), rtol=1e-5, atol=1e-6)


def _grads(out, params):
    return torch.autograd.grad(out.square().sum(), params)


@pytest.mark.parametrize("pool", sorted(POOLS))
@pytest.mark.parametrize("qk_norm", [False, True])
def test_fixed_mode_is_literal_vpt_deep_in_float64(pool, qk_norm):
    model = tiny_vit(pool, qk_norm=qk_norm).double()
    lengths = (3, 0, 5)
    dpl = FastDPLViT(model, mode="fixed", config=PromptConfig({"image": lengths}, stacks=("image",)),
                     impl="eager").double()  # prompts too: a float32 parameter gets a float32 gradient
    randomize(dpl)
    x = images(dtype=torch.float64)
    params = dpl.prompt_parameters() + dpl.head_parameters()
    ours = dpl(x)
    prompts = [dpl.prompt("image", b, n) if n else None for b, n in enumerate(lengths)]
    theirs = literal_vpt_deep(model, prompts, x)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for g, h in zip(_grads(ours, params), _grads(theirs, params)):
        torch.testing.assert_close(g, h, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("pool", sorted(POOLS))
@pytest.mark.parametrize("impl", ["eager", "reference"])
def test_search_mode_is_the_literal_supernet_in_float64(pool, impl):
    model = tiny_vit(pool, depth=2, qk_norm=True).double()
    dpl = FastDPLViT(model, candidate_lengths=(0, 1, 4, 7), impl=impl).double()
    randomize(dpl)
    x = images(batch=2, dtype=torch.float64)
    params = dpl.prompt_parameters() + dpl.arch_parameters() + dpl.head_parameters()
    ours, theirs = dpl(x), literal_vit(dpl, x)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for g, h in zip(_grads(ours, params), _grads(theirs, params)):
        torch.testing.assert_close(g, h, rtol=1e-9, atol=1e-12)


def test_the_backbone_is_frozen_and_the_head_trains():
    model = tiny_vit()
    dpl = FastDPLViT(model)
    groups = dpl.parameter_groups()
    assert set(groups) == {"arch", "prompt", "head"} and groups["head"] == list(model.head.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.head.parameters()}
    before = torch.get_rng_state()
    dpl.reset_head(torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), before) and torch.all(model.head.bias == 0)
    assert model.head.weight.abs().max() <= 0.04 + 1e-7
    config = dpl.derive_config()
    assert len(config.lengths["image"]) == 3 and set(config.lengths["image"]) <= {0, 1, 5, 10}


def test_unsupported_models_and_inputs_are_named():
    with pytest.raises(UnsupportedModelError, match="not a timm VisionTransformer"):
        FastDPLViT(torch.nn.Linear(3, 3))
    eva = timm.models.eva.Eva(img_size=12, patch_size=4, embed_dim=24, depth=1, num_heads=3, num_classes=5)
    with pytest.raises(UnsupportedModelError, match="Eva is not a timm VisionTransformer"):
        FastDPLViT(eva)
    with pytest.raises(UnsupportedModelError, match="attention dropout"):
        FastDPLViT(tiny_vit(attn_drop_rate=0.1))
    with pytest.raises(UnsupportedModelError, match="scale_attn_norm"):
        FastDPLViT(tiny_vit(scale_attn_norm=True))  # search mixes candidates before that norm
    with pytest.raises(ValueError, match="mode must be one of"):
        FastDPLViT(tiny_vit(), mode="grid")
    with pytest.raises(ValueError, match="impl must be one of"):
        FastDPLViT(tiny_vit(), impl="cuda")
    dpl = FastDPLViT(tiny_vit())
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\)"):
        dpl(torch.randn(2, 1, 12, 12))


@pytest.mark.parametrize("mode", ["search", "fixed"])
def test_state_rebuilds_itself(mode):
    config = PromptConfig({"image": (2, 0, 5)}, stacks=("image",)) if mode == "fixed" else None
    dpl = FastDPLViT(tiny_vit(), mode=mode, config=config, candidate_lengths=(0, 2, 5))
    randomize(dpl)
    dpl.reset_head(torch.Generator().manual_seed(4))
    x = images()
    state = dpl.prompt_state_dict()
    again = FastDPLViT.from_state(tiny_vit(), state)
    assert again.mode == mode and again.derive_config() == dpl.derive_config()
    torch.testing.assert_close(again(x), dpl(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a FastDPLViT state"):
        again.load_prompt_state_dict({"prompts": 1})
    with pytest.raises(ValueError):
        FastDPLViT.from_state(tiny_vit(depth=2), state)  # another depth: the bank refuses, naming it


# ---- VPT's prompt start and prompt dropout ----------------------------------------------------------
def test_vpt_init_is_uniform_within_the_xavier_bound_of_a_patch():
    """VPT's start: U(-b, b), b = sqrt(6 / (3 p^2 + W)); drawn from the generator, not the global RNG."""
    import math

    model = tiny_vit()
    state = torch.random.get_rng_state()
    dpl = FastDPLViT(model, mode="fixed", config=PromptConfig({"image": (40, 0, 25)}, stacks=("image",)),
                     init="vpt", generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), state)
    bound = math.sqrt(6.0 / (3 * 4 * 4 + 24))
    values = torch.cat([p.detach().flatten() for p in dpl.prompt_parameters()])
    assert values.abs().max() <= bound and values.abs().max() > 0.97 * bound
    assert abs(values.mean().item()) < 0.05 * bound and values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    again = FastDPLViT(tiny_vit(), mode="fixed", config=PromptConfig({"image": (40, 0, 25)}, stacks=("image",)),
                       init="vpt", generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(dpl.prompt_parameters(), again.prompt_parameters()))
    with pytest.raises(ValueError, match="init must be one of"):
        FastDPLViT(model, init="xavier")


def test_prompt_dropout_is_a_mask_per_image_in_training_only():
    """Training: each image's prompts dropped by its own mask (the literal VPT-deep forward on the same
    masks, drawn in block order from the global RNG as torch's dropout draws them); eval: no dropout."""
    model = tiny_vit().double()
    lengths, p = (3, 0, 5), 0.3
    dpl = FastDPLViT(model, mode="fixed", config=PromptConfig({"image": lengths}, stacks=("image",)),
                     impl="eager", prompt_dropout=p).double()
    randomize(dpl)
    x = images(batch=4, dtype=torch.float64)
    dpl.train()
    torch.manual_seed(11)
    ours = dpl(x)
    torch.manual_seed(11)
    dropped = [None if n == 0 else torch.nn.functional.dropout(dpl.prompt("image", b, n).expand(4, -1, -1), p)
               for b, n in enumerate(lengths)]
    assert not torch.equal(dropped[0][0], dropped[0][1])  # the masks differ between images
    torch.testing.assert_close(ours, literal_vpt_deep(model, dropped, x), rtol=1e-10, atol=1e-12)
    dpl.eval()
    plain = [dpl.prompt("image", b, n) if n else None for b, n in enumerate(lengths)]
    torch.testing.assert_close(dpl(x), literal_vpt_deep(model, plain, x), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="prompt_dropout is VPT's per-image dropout of fixed prompts"):
        FastDPLViT(tiny_vit(), prompt_dropout=0.1)
    with pytest.raises(ValueError, match=r"prompt_dropout must be in \[0, 1\)"):
        FastDPLViT(tiny_vit(), mode="fixed", config=PromptConfig({"image": lengths}, stacks=("image",)),
                   prompt_dropout=1.0)
    rebuilt = FastDPLViT.from_state(tiny_vit(), dpl.prompt_state_dict())
    assert rebuilt.prompt_dropout == p
