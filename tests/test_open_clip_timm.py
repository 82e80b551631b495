"""open_clip models with timm image towers, built with random weights from open_clip's own configs:
ViT-B-16-SigLIP (attention-pool head, bidirectional text read at the last position, logit bias),
vit_medium_patch16_gap_256 (average pooling, causal CLIP text) and MobileCLIP-B (class token,
convolutional stem). With zero-length prompts FastDPLPrompt is the model's own forward; with
prompts in both towers it matches a literal per-candidate implementation written against timm's
Block/Attention modules and open_clip's text blocks; only the exact savings apply; what it cannot
run is refused by name."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdpl import FastDPLPrompt, PromptConfig
from fastdpl.adapters import UnsupportedModelError
from fastdpl.literal import _literal_block as literal_open_clip_block
from helpers import CLASSNAMES, normalised_error
from test_hf_clip import assert_matches_literal

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("timm")

SIGLIP_LENGTH, SIGLIP_VOCAB = 64, 32000  # ViT-B-16-SigLIP's text_cfg


def siglip_tokenizer(texts):
    """A stand-in for SigLIP's SentencePiece tokenizer (no files offline): ids from the words, then
    end-of-text (1) and padding (1) to the context length, as open_clip's HFTokenizer pads."""
    rows = []
    for text in texts:
        ids = [2 + sum(map(ord, word)) % (SIGLIP_VOCAB - 2) for word in text.split()][: SIGLIP_LENGTH - 1] + [1]
        rows.append(ids + [1] * (SIGLIP_LENGTH - len(ids)))
    return torch.tensor(rows)


def build(name, depth=None, seed=0):
    """open_clip.create_model(name) with random weights; ``depth`` keeps the first blocks of each tower
    (CPU time), the blocks themselves untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None).eval()
    if depth is not None:
        del model.visual.trunk.blocks[depth:]
        del _text(model).transformer.resblocks[depth:]
    return model


def _text(model):
    return model.text if hasattr(model, "text") else model


def _tokenizer(model):
    return siglip_tokenizer if _text(model).vocab_size == SIGLIP_VOCAB else None  # None: CLIP's BPE


def _images(model, count=2, seed=1):
    size = model.visual.image_size
    return torch.randn(count, 3, *size, generator=torch.Generator().manual_seed(seed))


def own_logits(model, images, tokens):
    image, text, scale, *bias = model(images, tokens)  # normalised features
    logits = scale * image @ text.T
    return logits + bias[0] if bias and bias[0] is not None else logits


# name: (the savings that are exact, whether the image feature is read at one row)
FAMILY = {"ViT-B-16-SigLIP": ({"last_block_rows"}, False),
          "vit_medium_patch16_gap_256": ({"truncate_text", "last_block_rows"}, False),
          "MobileCLIP-B": ({"truncate_text", "last_block_rows"}, True)}


@pytest.mark.parametrize("name", list(FAMILY))
def test_zero_length_prompts_are_the_models_own_forward(name):
    model = build(name)
    blocks = {"image": len(model.visual.trunk.blocks), "text": len(_text(model).transformer.resblocks)}
    dpl = FastDPLPrompt(model, CLASSNAMES, mode="fixed", config=PromptConfig.zero_shot(blocks),
                        tokenizer=_tokenizer(model))
    images = _images(model)
    with torch.no_grad():
        assert normalised_error(dpl(images), own_logits(model, images, dpl.class_tokens)) < 1e-5
    savings, one_row = FAMILY[name]
    assert dpl._savings == savings
    assert (dpl.adapter.image_pooled_rows(2, "cpu") is not None) == one_row
    causal = "truncate_text" in savings
    assert (dpl.text_length() < dpl.class_tokens.shape[1]) == causal  # SigLIP's text runs all 64 positions


# ---- the literal supernet, written against timm's and open_clip's own modules ------------------------
def literal_timm_block(block, x, candidates):
    """timm's Block with each candidate's prompts as extra keys and values (timm's own qkv layout:
    (..., 3, heads, head_dim)), the attention outputs weighted-summed."""
    attn = block.attn
    h = block.norm1(x)
    batch, n, _ = h.shape

    def qkv(t):
        return attn.qkv(t).reshape(batch, t.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)

    q = attn.q_norm(qkv(h)[0])
    out = 0
    for weight, prompt in candidates:
        kv_in = h if prompt is None else torch.cat([h, block.norm1(prompt).expand(batch, -1, -1)], dim=1)
        _, k, v = qkv(kv_in)
        scores = (q * attn.scale) @ attn.k_norm(k).transpose(-1, -2)
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, attn.attn_dim)
        attended = attn.proj(attn.norm(attended))
        out = out + (attended if weight is None else weight * attended)
    x = x + block.ls1(out)
    return x + block.ls2(block.mlp(block.norm2(x)))


def first_block_input(trunk, images):
    """What the trunk's own forward feeds its first block (patches, prefix tokens, positions)."""
    seen = []
    handle = trunk.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            trunk.forward_features(images)
    finally:
        handle.remove()
    return seen[0]


def _candidates(dpl, tower, block):
    lengths = dpl.prompted[tower][block]
    weights = torch.softmax(dpl.arch_logits[tower][block], 0) if dpl.mode == "search" else [None]
    return [(weights[c], dpl.prompt(tower, block, n) if n else None) for c, n in enumerate(lengths)]


def literal_logits(dpl, model, images, tokens):
    trunk, text = model.visual.trunk, _text(model)
    x = first_block_input(trunk, images)
    for b, block in enumerate(trunk.blocks):
        x = literal_timm_block(block, x, _candidates(dpl, "image", b))
    image = model.visual.head(trunk.forward_head(trunk.norm(x)))  # every row, as TimmModel.forward does
    t = text.token_embedding(tokens) + text.positional_embedding
    n = tokens.shape[1]
    mask = torch.full((n, n), float("-inf"), dtype=t.dtype).triu(1) if text.attn_mask is not None else None
    for b, block in enumerate(text.transformer.resblocks):
        t = literal_open_clip_block(block, t, _candidates(dpl, "text", b), mask)
    pool = getattr(text, "text_pool_type", None) or text.pool_type  # CLIP keeps it as text_pool_type
    rows = t[:, -1] if pool == "last" else t[torch.arange(len(tokens)), tokens.argmax(-1)]
    projection = text.text_projection  # a Linear (SigLIP) or a matrix (CLIP)
    text_features = projection(text.ln_final(rows)) if isinstance(projection, nn.Linear) else \
        text.ln_final(rows) @ projection
    logits = model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text_features, dim=-1).T
    return logits + model.logit_bias if model.logit_bias is not None else logits


def _norms(model, seed=5):
    """qk_norm in the image tower's first block and a scale_norm (inner LayerNorm) in its second, with
    random affine parameters, so their exactness shows in the logits."""
    trunk = model.visual.trunk
    gen = torch.Generator().manual_seed(seed)
    first, second = trunk.blocks[0].attn, trunk.blocks[1].attn
    first.q_norm, first.k_norm = nn.LayerNorm(first.head_dim, eps=1e-6), nn.LayerNorm(first.head_dim, eps=1e-6)
    second.norm = nn.LayerNorm(second.attn_dim, eps=1e-6)
    with torch.no_grad():
        for norm in (first.q_norm, first.k_norm, second.norm):
            norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=gen))
            norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=gen))
    return model


@pytest.mark.parametrize("name,mode", [("ViT-B-16-SigLIP", "search"), ("vit_medium_patch16_gap_256", "search"),
                                       ("MobileCLIP-B", "fixed")])
def test_prompts_in_both_towers_match_a_literal_implementation_with_gradients(name, mode):
    """In float64, so that a difference of maths shows above rounding (width 768 sums in fp32 leave
    ~1e-5 on the small alpha gradients, on both sides alike)."""
    model = build(name, depth=2, seed=2)
    tokenizer = _tokenizer(model)
    if mode == "search":  # qk_norm only: scale_norm is fixed-mode only
        first = _norms(model).visual.trunk.blocks[0].attn
        model.visual.trunk.blocks[1].attn.norm = nn.Identity()
        dpl = FastDPLPrompt(model, CLASSNAMES, candidate_lengths=(0, 1, 3), impl="eager", tokenizer=tokenizer)
    else:
        _norms(model)
        dpl = FastDPLPrompt(model, CLASSNAMES, mode="fixed", impl="eager", tokenizer=tokenizer,
                            config=PromptConfig({"image": (2, 3), "text": (3, 1)}))
    model.double(), dpl.double()
    tokens = dpl.class_tokens
    assert_matches_literal(dpl, lambda images: literal_logits(dpl, model, images, tokens),
                           _images(model).double(), tol=1e-10)


# ---- what is refused, by name ----------------------------------------------------------------------
def test_scale_norm_is_refused_by_a_search_and_runs_in_fixed_mode():
    model = _norms(build("ViT-B-16-SigLIP", depth=2))
    with pytest.raises(UnsupportedModelError, match="image tower block 1: timm Attention with scale_norm"):
        FastDPLPrompt(model, CLASSNAMES, tokenizer=siglip_tokenizer)
    FastDPLPrompt(model, CLASSNAMES, candidate_lengths=(0, 2), towers=("text",), tokenizer=siglip_tokenizer)


@pytest.mark.parametrize("change,message", [
    (lambda m: setattr(m.visual.trunk.blocks[1].attn.attn_drop, "p", 0.1), "block 1: attention dropout"),
    (lambda m: setattr(m.visual.trunk.blocks[0].attn, "gate", nn.Linear(768, 768)), "block 0: gated attention"),
    (lambda m: setattr(m.text, "use_pad_mask", True), "use_pad_mask"),
    (lambda m: setattr(m.text, "pool_type", "none"), "pool type 'none' is unsupported"),
])
def test_options_fastdpl_cannot_run_exactly_are_refused_by_name(change, message):
    model = build("ViT-B-16-SigLIP", depth=2)
    change(model)
    with pytest.raises(UnsupportedModelError, match=message):
        FastDPLPrompt(model, CLASSNAMES, tokenizer=siglip_tokenizer)


def test_other_timm_trunks_are_refused_by_name():
    model = build("convnext_tiny")
    with pytest.raises(UnsupportedModelError, match="timm image tower ConvNeXt is unsupported"):
        FastDPLPrompt(model, CLASSNAMES)


def test_auto_tokenizer_is_open_clips_own_for_siglip_and_says_what_to_do_offline(monkeypatch):
    from fastdpl.models import ModelLoadError, load_tokenizer

    assert load_tokenizer("auto", "ViT-B-16") is None and load_tokenizer("auto", "tiny") is None  # CLIP's BPE
    asked = []
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name: asked.append(name) or siglip_tokenizer)
    assert load_tokenizer("auto", "ViT-B-16-SigLIP") is siglip_tokenizer and asked == ["ViT-B-16-SigLIP"]

    def offline(name):
        raise OSError("couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(open_clip, "get_tokenizer", offline)
    expected = "(?s)ViT-B-16-SigLIP's tokenizer 'timm/ViT-B-16-SigLIP'.*--tokenizer FOLDER"
    with pytest.raises(ModelLoadError, match=expected):
        load_tokenizer("auto", "ViT-B-16-SigLIP")
