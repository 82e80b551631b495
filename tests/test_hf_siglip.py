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


# ---- a local Hugging Face SigLIP folder through the pipeline ----------------------------------------
def save_word_tokenizer(folder, texts):
    """A word-level fast tokenizer over ``texts``' words, saved as Hugging Face tokenizer files (the
    shape of SigLIP's: end-of-text and padding are both id 1), so the folder holds a model and its
    tokenizer like a downloaded one."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)})  # as Whitespace splits
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="</s>",
                                         eos_token="</s>").save_pretrained(folder)
    return vocab


def _digits_texts():
    from fastdpl.data import load_dataset
    from fastdpl.templates import IMAGENET_TEMPLATES

    names = [c.replace("_", " ") for c in load_dataset("builtin:digits").classnames]
    return [t.format(n) for t in IMAGENET_TEMPLATES for n in names]


def test_auto_tokenizer_is_the_folders_own_and_pads_as_siglip(tmp_path):
    from fastdpl.models import load_clip, load_tokenizer

    folder = tmp_path / "siglip"
    siglip().save_pretrained(folder)
    vocab = save_word_tokenizer(folder, ["a photo of a cat.", "a photo of a dog."])
    model = load_clip(str(folder), None)
    assert type(model).__name__ == "SiglipModel"
    ids = load_tokenizer("auto", str(folder), model)(["a photo of a cat.", "a dog"])
    expected = [[vocab[w] for w in ("a", "photo", "of", "a", "cat", ".")] + [1] * 10,
                [vocab["a"], vocab["dog"]] + [1] * 14]
    assert ids.tolist() == expected  # end-of-text then padding (id 1) to the context length


def test_a_folder_without_tokenizer_files_or_a_bad_tokenizer_setting_is_one_clear_error(tmp_path):
    from fastdpl.models import ModelLoadError, load_clip, load_tokenizer

    folder = tmp_path / "siglip"
    siglip().save_pretrained(folder)
    model = load_clip(str(folder), None)
    with pytest.raises(ModelLoadError, match="has no tokenizer files: .* --tokenizer FOLDER"):
        load_tokenizer("auto", str(folder), model)
    with pytest.raises(ModelLoadError, match="tokenizer 'nowhere' is neither auto, clip nor a folder"):
        load_tokenizer("nowhere", str(folder), model)


def test_pipeline_search_and_train_one_epoch_on_a_local_hf_siglip_folder(tmp_path):
    from fastdpl.pipeline import stages
    from fastdpl.pipeline.demo import demo_config

    folder = tmp_path / "hf-siglip"
    siglip(seed=5).save_pretrained(folder)
    save_word_tokenizer(folder, _digits_texts())
    common = dict(model=str(folder), pretrained=None, shots=1, search_epochs=1, train_epochs=1, batch_size=4,
                  val_batch_size=4, candidate_lengths=[0, 1, 2], output=str(tmp_path / "run"), resume=False,
                  progress=False, eval_batch_size=256)
    search = stages.run_search(demo_config(**common))
    assert search["history"][0]["epoch"] == 1 and len(search["config"]["lengths"]["image"]) == 3
    trained = stages.run_train(demo_config(**common))  # the 60-template ensemble, through the folder's tokenizer
    assert trained["method"] == "dpl" and 0 <= trained["top1"] <= 1


def test_tpt_context_sits_where_siglips_words_are():
    """SigLIP's tokens have no start-of-text: "a photo of a" is positions 0..3, and a context of those
    words' own embeddings gives the template's own text features (positions 1..4 would not)."""
    from fastdpl import TestTimePromptTuner

    model = siglip(seed=6)
    dpl = FastDPLPrompt(model, CLASSNAMES, mode="fixed", config=PromptConfig.zero_shot({"image": 3, "text": 3}),
                        tokenizer=tokenizer)
    assert dpl.text_start == 0 and dpl.leading_words("a photo of a") == 4
    tuner = TestTimePromptTuner(dpl, context="a photo of a")
    context = tuner.initial["context"]
    with torch.no_grad():
        assert normalised_error(tuner.encode_text({"context": context[None]})[0], dpl.encode_text()) < 1e-6
        shifted = torch.cat([dpl.token_embeddings()[0, :1], context[:-1]])  # what a CLIP offset would place
        assert normalised_error(tuner.encode_text({"context": shifted[None]})[0], dpl.encode_text()) > 1e-3
    with pytest.raises(ValueError, match="must start with these words"):
        TestTimePromptTuner(dpl, context="a picture of")


def test_siglip2_naflex_is_refused_by_name():
    from fastdpl.adapters import UnsupportedModelError

    config = transformers.Siglip2Config(
        text_config=dict(hidden_size=48, intermediate_size=96, num_attention_heads=3, num_hidden_layers=2,
                         vocab_size=1000, max_position_embeddings=LENGTH, bos_token_id=None, eos_token_id=1),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                           patch_size=8))
    with pytest.raises(UnsupportedModelError, match="Siglip2Model: NaFlex patch embeddings"):
        FastDPLPrompt(transformers.Siglip2Model(config), CLASSNAMES, tokenizer=tokenizer)
