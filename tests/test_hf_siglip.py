"""Hugging Face transformers' SiglipModel (random weights from its config, no download): a
non-causal text tower read at its last position, an attention-pooling image head and a logit
bias. FastDPLPrompt with zero-length prompts is the model's own forward; with prompts in both
towers it matches a literal per-candidate implementation written against transformers' modules;
only the savings that are exact for SigLIP apply."""
import pytest
import torch
import torch.nn.functional as F

from fastdpl import FastDPLPrompt, PromptConfig
from helpers import CLASSNAMES, normalised_error

transformers = pytest.importorskip("transformers")
LENGTH = 16  # SigLIP pads every text to the context length and reads the last position


def siglip(seed=0):
    config = transformers.SiglipConfig(
        text_config=dict(hidden_size=48, intermediate_size=96, num_attention_heads=3, num_hidden_layers=3,
                         vocab_size=1000, max_position_embeddings=LENGTH, projection_size=64, bos_token_id=None,
                         eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3,
                           image_size=32, patch_size=8))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.SiglipModel(config).eval()
        with torch.no_grad():  # the init sets scale and bias to 0: give them values that show in the logits
            model.logit_scale.fill_(1.5)
            model.logit_bias.fill_(-2.0)
    return model


def tokenizer(texts):
    """A stand-in for SigLIP's SentencePiece tokenizer (no files offline): ids from each text's words,
    then end-of-text (1) and padding (1) to the fixed length."""
    rows = []
    for text in texts:
        ids = [2 + sum(map(ord, word)) % 990 for word in text.split()][: LENGTH - 1] + [1]
        rows.append(ids + [1] * (LENGTH - len(ids)))
    return torch.tensor(rows)


def _images(seed=1):
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _tokens():
    return tokenizer([f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES])


def test_zero_length_prompts_are_the_models_own_forward_with_its_logit_bias():
    model = siglip()
    dpl = FastDPLPrompt(model, CLASSNAMES, mode="fixed", config=PromptConfig.zero_shot({"image": 3, "text": 3}),
                        tokenizer=tokenizer)
    with torch.no_grad():
        own = model(input_ids=_tokens(), pixel_values=_images()).logits_per_image
        assert normalised_error(dpl(_images()), own) < 1e-5
    assert dpl._savings == {"last_block_rows"}  # no truncation: the text tower is not causal
    assert dpl.text_length() == LENGTH


def _literal_layer(layer, x, candidates):
    """One SiglipEncoderLayer with the candidates' prompts as extra keys and values (no mask)."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    batch, n, width = h.shape
    split = lambda t: t.view(t.shape[0], t.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)  # noqa: E731
    q = split(attn.q_proj(h))
    out = 0
    for weight, prompt in candidates:
        kv_in = h if prompt is None else torch.cat([h, layer.layer_norm1(prompt).expand(batch, -1, -1)], dim=1)
        k, v = split(attn.k_proj(kv_in)), split(attn.v_proj(kv_in))
        attended = attn.out_proj((((q * attn.scale) @ k.transpose(-1, -2)).softmax(-1) @ v)
                                 .transpose(1, 2).reshape(batch, n, width))
        out = out + (attended if weight is None else weight * attended)
    x = x + out
    return x + layer.mlp(layer.layer_norm2(x))


def literal_logits(dpl, model, images, tokens):
    def candidates(tower, block):
        weights = torch.softmax(dpl.arch_logits[tower][block], 0)
        return [(weights[c], dpl.prompt(tower, block, n) if n else None)
                for c, n in enumerate(dpl.prompted[tower][block])]

    vision, text = model.vision_model, model.text_model
    x = vision.embeddings(images)
    for b, layer in enumerate(vision.encoder.layers):
        x = _literal_layer(layer, x, candidates("image", b))
    image = vision.head(vision.post_layernorm(x))
    t = text.embeddings(input_ids=tokens)
    for b, layer in enumerate(text.encoder.layers):
        t = _literal_layer(layer, t, candidates("text", b))
    text_features = text.head(text.final_layer_norm(t)[:, -1])
    cosine = F.normalize(image, dim=-1) @ F.normalize(text_features, dim=-1).T
    return model.logit_scale.exp() * cosine + model.logit_bias


def test_prompts_in_both_towers_match_a_literal_implementation_with_gradients():
    model = siglip(seed=2)
    dpl = FastDPLPrompt(model, CLASSNAMES, candidate_lengths=(0, 1, 3), impl="eager", tokenizer=tokenizer)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in dpl.arch_parameters() + dpl.prompt_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    params = dpl.arch_parameters() + dpl.prompt_parameters()
    labels = torch.arange(3) % len(CLASSNAMES)
    fast, ref = dpl(_images()), literal_logits(dpl, model, _images(), _tokens())
    assert normalised_error(fast, ref) < 1e-5
    grads = torch.autograd.grad(F.cross_entropy(fast, labels), params)
    ref_grads = torch.autograd.grad(F.cross_entropy(ref, labels), params)
    for g, r in zip(grads, ref_grads):
        assert r.abs().max() > 0 and normalised_error(g, r) < 1e-5
