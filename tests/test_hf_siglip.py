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
from test_hf_clip import _literal_layer, assert_matches_literal  # CLIP-structure layers, written literally

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


def literal_logits(dpl, model, images, tokens):
    def candidates(tower, block):
        weights = torch.softmax(dpl.arch_logits[tower][block], 0)
        return [(weights[c], dpl.prompt(tower, block, n) if n else None)
                for c, n in enumerate(dpl.prompted[tower][block])]

    vision, text = model.vision_model, model.text_model
    x = vision.embeddings(images)
    for b, layer in enumerate(vision.encoder.layers):
        x = _literal_layer(layer, x, candidates("image", b), causal=False)
    image = vision.head(vision.post_layernorm(x))
    t = text.embeddings(input_ids=tokens)
    for b, layer in enumerate(text.encoder.layers):
        t = _literal_layer(layer, t, candidates("text", b), causal=False)  # SigLIP's text: no mask
    text_features = text.head(text.final_layer_norm(t)[:, -1])
    cosine = F.normalize(image, dim=-1) @ F.normalize(text_features, dim=-1).T
    return model.logit_scale.exp() * cosine + model.logit_bias


def test_prompts_in_both_towers_match_a_literal_implementation_with_gradients():
    model = siglip(seed=2)
    dpl = FastDPLPrompt(model, CLASSNAMES, candidate_lengths=(0, 1, 3), impl="eager", tokenizer=tokenizer)
    assert_matches_literal(dpl, lambda images: literal_logits(dpl, model, images, _tokens()), _images())


def test_coop_refuses_a_model_whose_tokenizer_it_cannot_arrange():
    from fastdpl.adapters import UnsupportedModelError
    from fastdpl.methods import CoOpPrompt

    with pytest.raises(UnsupportedModelError, match="arranges CLIP's BPE tokens .* 1000 tokens"):
        CoOpPrompt(siglip(), CLASSNAMES)
