"""Hugging Face transformers' CLIPModel (random weights from its config, no download): FastDPLPrompt
with zero-length prompts is the model's own forward, and with prompts in both towers it matches a
literal per-candidate implementation written here against transformers' own modules."""
import pytest
import torch
import torch.nn.functional as F

from fastdpl import FastDPLPrompt, PromptConfig
from helpers import CLASSNAMES, normalised_error

transformers = pytest.importorskip("transformers")


def hf_clip(seed=0):
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=48, intermediate_size=96, num_attention_heads=3, num_hidden_layers=3,
                         vocab_size=49408, max_position_embeddings=77, eos_token_id=49407),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3,
                           image_size=32, patch_size=8), projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.CLIPModel(config).eval()


def _tokens(template="a photo of a {}."):
    import open_clip  # CLIP's BPE: the same ids as the model's tokenizer (there are no tokenizer files offline)

    return open_clip.tokenize([template.format(c.replace("_", " ")) for c in CLASSNAMES])


def _images(seed=1):
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_zero_length_prompts_are_the_models_own_forward():
    model = hf_clip()
    dpl = FastDPLPrompt(model, CLASSNAMES, mode="fixed", config=PromptConfig.zero_shot({"image": 3, "text": 3}))
    with torch.no_grad():
        own = model(input_ids=_tokens(), pixel_values=_images()).logits_per_image
        assert normalised_error(dpl(_images()), own) < 1e-5


# ---- a literal supernet written against transformers' modules ----------------------------------------
def _literal_layer(layer, x, candidates, causal):
    """One CLIPEncoderLayer with the candidates' prompts as extra keys and values, weighted-summed."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    batch, n, width = h.shape
    split = lambda t: t.view(t.shape[0], t.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)  # noqa: E731
    q = split(attn.q_proj(h))
    out = 0
    for weight, prompt in candidates:
        kv_in = h if prompt is None else torch.cat([h, layer.layer_norm1(prompt).expand(batch, -1, -1)], dim=1)
        k, v = split(attn.k_proj(kv_in)), split(attn.v_proj(kv_in))
        scores = (q * attn.scale) @ k.transpose(-1, -2)
        if causal:
            mask = torch.zeros(n, k.shape[2], dtype=torch.bool)
            mask[:, :n] = torch.ones(n, n, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        attended = attn.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, width))
        out = out + (attended if weight is None else weight * attended)
    x = x + out
    return x + layer.mlp(layer.layer_norm2(x))


def _candidates(dpl, tower, block):
    lengths = dpl.prompted[tower][block]
    weights = torch.softmax(dpl.arch_logits[tower][block], 0) if dpl.mode == "search" else [None]
    return [(weights[c], dpl.prompt(tower, block, n) if n else None) for c, n in enumerate(lengths)]


def literal_logits(dpl, model, images, tokens):
    vision, text = model.vision_model, model.text_model
    x = vision.pre_layrnorm(vision.embeddings(images))
    for b, layer in enumerate(vision.encoder.layers):
        x = _literal_layer(layer, x, _candidates(dpl, "image", b), causal=False)
    image = model.visual_projection(vision.post_layernorm(x[:, 0]))
    t = text.embeddings(input_ids=tokens)
    for b, layer in enumerate(text.encoder.layers):
        t = _literal_layer(layer, t, _candidates(dpl, "text", b), causal=True)
    t = text.final_layer_norm(t)[torch.arange(len(tokens)), tokens.argmax(-1)]
    text_features = model.text_projection(t)
    return model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text_features, dim=-1).T


@pytest.mark.parametrize("mode", ["search", "fixed"])
def test_prompts_in_both_towers_match_a_literal_implementation_with_gradients(mode):
    model = hf_clip(seed=2)
    if mode == "search":
        dpl = FastDPLPrompt(model, CLASSNAMES, candidate_lengths=(0, 2, 3), impl="eager")
    else:
        dpl = FastDPLPrompt(model, CLASSNAMES, mode="fixed", impl="eager",
                            config=PromptConfig({"image": (2, 0, 1), "text": (3, 1, 0)}))
    assert_matches_literal(dpl, lambda images: literal_logits(dpl, model, images, _tokens()), _images())


def assert_matches_literal(dpl, literal, images, tol=1e-5):
    """Random alpha and prompts; the logits and every alpha/prompt gradient equal the literal's."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in dpl.arch_parameters() + dpl.prompt_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    params = dpl.arch_parameters() + dpl.prompt_parameters()
    labels = torch.arange(len(images)) % dpl.num_classes
    fast, ref = dpl(images), literal(images)
    assert normalised_error(fast, ref) < tol
    grads = torch.autograd.grad(F.cross_entropy(fast, labels), params)
    ref_grads = torch.autograd.grad(F.cross_entropy(ref, labels), params)
    for g, r in zip(grads, ref_grads):
        assert r.abs().max() > 0 and normalised_error(g, r) < tol


def test_coop_and_the_savings_on_hf_clip():
    from fastdpl.methods import CoOpPrompt

    model = hf_clip(seed=4)
    coop = CoOpPrompt(model, CLASSNAMES, ctx_init="a photo of a")  # from words: zero-shot CLIP exactly
    with torch.no_grad():
        own = model(input_ids=_tokens(), pixel_values=_images()).logits_per_image
        assert normalised_error(coop(_images()), own) < 1e-5
    assert coop.clip._savings == {"truncate_text", "last_block_rows"}  # a causal text tower, one pooled row


def test_pipeline_search_and_train_one_epoch_on_a_local_hf_clip_folder(tmp_path):
    from fastdpl.models import load_clip
    from fastdpl.pipeline import stages
    from fastdpl.pipeline.demo import demo_config

    folder = tmp_path / "hf-clip"
    hf_clip(seed=5).save_pretrained(folder)
    assert type(load_clip(str(folder), None)).__name__ == "CLIPModel"
    common = dict(model=str(folder), pretrained=None, shots=1, search_epochs=1, train_epochs=1, batch_size=4,
                  val_batch_size=4, candidate_lengths=[0, 1, 2], output=str(tmp_path / "run"), resume=False,
                  progress=False, eval_batch_size=256)
    search = stages.run_search(demo_config(**common))
    assert search["history"][0]["epoch"] == 1 and len(search["config"]["lengths"]["image"]) == 3
    trained = stages.run_train(demo_config(**common))
    assert trained["method"] == "dpl" and 0 <= trained["top1"] <= 1
