"""fastdpl interpret: the vocabulary tokens nearest to learned vectors by Euclidean distance (CoOp's
interpret_prompt.py), against a float64 brute-force scan of the vocabulary; what is not in the
token-embedding space is reported, not skipped."""
import json

import pytest
import torch

from fastdpl.cli import main
from fastdpl.config import PromptConfig
from fastdpl.interpret import interpret, nearest_tokens
from fastdpl.methods import CoCoOpPrompt, CoOpPrompt
from fastdpl.models import load_clip
from fastdpl.prompt import FastDPLPrompt
from helpers import CLASSNAMES, tiny_clip


def _decode(i):
    from open_clip.tokenizer import _tokenizer

    return _tokenizer.decoder[i]


def _embedding(model):
    return model.token_embedding.weight.detach()


def test_nearest_tokens_are_a_brute_force_scan_of_the_vocabulary():
    embedding = _embedding(tiny_clip())
    vectors = torch.randn(4, embedding.shape[1], generator=torch.Generator().manual_seed(1)) * 0.05
    ids, distances = nearest_tokens(vectors, embedding, 5)
    table = embedding.double()
    for v, row_ids, row_d in zip(vectors.double(), ids, distances):
        scan = ((table - v) ** 2).sum(1).sqrt()
        expected = scan.argsort()[:5]
        assert row_ids.tolist() == expected.tolist()
        torch.testing.assert_close(row_d.double(), scan[expected], rtol=1e-5, atol=1e-6)


def test_a_context_started_from_words_reads_back_as_those_words():
    model = tiny_clip()
    coop = CoOpPrompt(model, CLASSNAMES, ctx_init="a photo of a")
    result = interpret(coop.prompt_state_dict(), _embedding(model), _decode, topk=2)
    assert [r["tokens"][0] for r in result["vectors"]] == ["a</w>", "photo</w>", "of</w>", "a</w>"]
    assert all(r["distances"][0] == pytest.approx(0, abs=1e-5) for r in result["vectors"])
    assert result["not_interpretable"] == []
    cocoop = interpret(CoCoOpPrompt(model, CLASSNAMES).prompt_state_dict(), _embedding(model), _decode)
    assert [r["label"] for r in cocoop["vectors"]] == ["cocoop context"] * 4
    assert cocoop["not_interpretable"][0]["label"] == "cocoop meta-network bias"
    per_class = interpret(CoOpPrompt(model, CLASSNAMES, n_ctx=2, class_specific=True).prompt_state_dict(),
                          _embedding(model), _decode)
    assert [r["label"] for r in per_class["vectors"]] == [f"coop context, class {c}" for c in range(5) for _ in (0, 1)]


def test_dpl_text_prompts_at_the_first_block_are_read_and_the_rest_reported():
    model = tiny_clip()
    blocks = {"image": 3, "text": 3}
    config = PromptConfig({"image": (2, 0, 0), "text": (2, 1, 0)})
    assert config.lengths["text"][0] == 2 and len(config.lengths["image"]) == blocks["image"]
    dpl = FastDPLPrompt(model, CLASSNAMES, mode="fixed", config=config)
    import open_clip

    words = open_clip.tokenize(["dog cat"])[0, 1:3]
    with torch.no_grad():
        dpl.prompt("text", 0, 2).copy_(model.token_embedding(words) + 1e-3)
    result = interpret(dpl.prompt_state_dict(), _embedding(model), _decode, topk=1)
    assert [(r["label"], r["tokens"]) for r in result["vectors"]] == \
        [("text prompts, block 0, length 2", ["dog</w>"]), ("text prompts, block 0, length 2", ["cat</w>"])]
    reasons = {r["label"]: r["reason"] for r in result["not_interpretable"]}
    assert set(reasons) == {"text prompts, block 1, length 1", "image prompts, block 0, length 2"}
    assert "after 1 blocks" in reasons["text prompts, block 1, length 1"]


def test_the_command_line_reads_a_prompts_file_and_never_overwrites(tmp_path, capsys):
    model = load_clip("tiny")
    path = tmp_path / "prompts.pt"
    torch.save({**CoOpPrompt(model, ["cat", "dog"], ctx_init="a photo of a").prompt_state_dict(),
                "settings": {"model": "tiny", "pretrained": None}}, path)
    assert main(["interpret", str(path), "--topk", "1"]) == 0
    printed = capsys.readouterr().out
    assert "coop context #2: 'photo</w>' 0.0000" in printed
    saved = json.loads((tmp_path / "interpretation.json").read_text())
    assert saved["model"] == "tiny" and len(saved["vectors"]) == 4
    assert main(["interpret", str(path)]) == 2
    assert "interpretation.json exists" in capsys.readouterr().err
    assert main(["interpret", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "no prompts file at" in err and "Traceback" not in err


def test_a_classifiers_prompts_are_reported_not_interpretable(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    from fastdpl.vit import FastDPLViT

    dpl = FastDPLViT(timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=2,
                                                                      num_heads=2, num_classes=3))
    path = tmp_path / "vit.pt"
    torch.save({**dpl.prompt_state_dict(), "settings": {"model": "timm:tiny"}}, path)
    assert main(["interpret", str(path), "--out", str(tmp_path / "vit.json")]) == 0
    assert "not interpretable: every prompt (a timm classifier's prompts are image prompts" in capsys.readouterr().out
