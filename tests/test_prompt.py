"""FastDPLPrompt against the literal authors'-style supernet, and its public API."""
import json

import pytest
import torch

import fastdpl.profiling as profiling
from fastdpl import FastDPLPrompt, PromptConfig
from fastdpl.literal import literal_logits
from fastdpl.adapters import UnsupportedModelError
from helpers import CLASSNAMES, TRITON_DEVICE, assert_matches, normalised_error, tiny_clip

needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton needs CUDA or TRITON_INTERPRET=1")
REL_TOL = 1e-4  # fp32 relative error allowed against the literal implementation


def _images(batch=3, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _randomize(dpl, seed=2):
    """Random alpha (far from uniform) and prompts of a size that moves the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dpl.arch_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        for p in dpl.prompt_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def _logits_and_grads(fn, dpl, images):
    logits = fn(images)
    params = dpl.arch_parameters() + dpl.prompt_parameters()
    # A loss that touches every class and every image (cross-entropy against fixed labels).
    labels = torch.arange(images.shape[0]) % logits.shape[1]
    loss = torch.nn.functional.cross_entropy(logits, labels)
    return logits.detach(), torch.autograd.grad(loss, params)


def _assert_equivalent(dpl, images, tol=REL_TOL):
    logits, grads = _logits_and_grads(dpl, dpl, images)
    ref_logits, ref_grads = _logits_and_grads(lambda x: literal_logits(dpl, x), dpl, images)
    assert normalised_error(logits, ref_logits) < tol
    names = list(dpl.arch_logits) + list(dpl.prompts)
    assert len(grads) == len(names) > 0
    for name, g, r in zip(names, grads, ref_grads):
        assert r.abs().max() > 0, f"{name}: reference gradient is zero (test would be vacuous)"
        err = normalised_error(g, r)
        assert err < tol, f"{name}: relative error {err:.2e}"


# ---- equivalence with the literal supernet -----------------------------------------------------------

@pytest.mark.parametrize("impl", ["eager", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("lengths", [range(7), (0, 3, 0 + 1, 9)], ids=["0to6", "irregular"])
def test_search_mode_matches_literal_supernet(impl, lengths):
    lengths = tuple(dict.fromkeys(lengths))  # distinct, in order
    model = tiny_clip().to(TRITON_DEVICE if impl == "triton" else "cpu")
    dpl = FastDPLPrompt(model, CLASSNAMES, candidate_lengths=lengths, impl=impl)
    _randomize(dpl)
    _assert_equivalent(dpl, _images().to(next(model.parameters()).device))


@pytest.mark.parametrize("towers", [("image",), ("text",)])
def test_search_mode_one_tower(towers):
    dpl = FastDPLPrompt(tiny_clip(), CLASSNAMES, towers=towers, candidate_lengths=(0, 2, 5), impl="eager")
    _randomize(dpl)
    assert list(dpl.arch_logits) == list(towers)
    _assert_equivalent(dpl, _images())


@pytest.mark.parametrize("impl", ["eager", pytest.param("triton", marks=needs_triton)])
def test_fixed_mode_matches_literal_concatenated_attention(impl):
    config = PromptConfig({"image": (4, 0, 2), "text": (0, 7, 1)})
    model = tiny_clip().to(TRITON_DEVICE if impl == "triton" else "cpu")
    dpl = FastDPLPrompt(model, CLASSNAMES, mode="fixed", config=config, impl=impl)
    _randomize(dpl)
    assert dpl.arch_parameters() == []
    _assert_equivalent(dpl, _images().to(next(model.parameters()).device))


def test_zero_shot_config_equals_open_clip_forward():
    """No prompts: exactly open_clip's own encoders (an oracle that shares no fastdpl code)."""
    import open_clip

    model = tiny_clip()
    dpl = FastDPLPrompt(model, CLASSNAMES, mode="fixed", config=PromptConfig.zero_shot(3), impl="eager")
    images = _images()
    with torch.no_grad():
        texts = open_clip.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES])
        image_features = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        text_features = torch.nn.functional.normalize(model.encode_text(texts), dim=-1)
        expected = model.logit_scale.exp() * image_features @ text_features.T
        assert normalised_error(dpl(images), expected) < 1e-5


@pytest.mark.parametrize("saving", ["truncate_text", "last_block_rows"])
def test_each_exact_saving_changes_no_output(saving):
    dpl = FastDPLPrompt(tiny_clip(), CLASSNAMES, impl="eager")
    _randomize(dpl)
    images = _images()
    with_saving, grads = _logits_and_grads(dpl, dpl, images)
    dpl._savings.discard(saving)
    without, grads_without = _logits_and_grads(dpl, dpl, images)
    assert normalised_error(with_saving, without) < 1e-5
    for g, r in zip(grads, grads_without):
        assert normalised_error(g, r) < 1e-5


def test_text_is_truncated_to_longest_end_of_text():
    dpl = FastDPLPrompt(tiny_clip(), ["cat", "dog"], impl="eager")
    # "a photo of a cat." -> start, a, photo, of, a, cat, ., end: end-of-text at position 7.
    assert dpl._end_of_text_list == [7, 7]
    seen = []
    handle = dpl.model.transformer.resblocks[0].ln_1.register_forward_hook(
        lambda mod, inp, out: seen.append(inp[0].shape))
    dpl.encode_text()
    handle.remove()
    assert (2, 8, 48) in seen  # the block's input rows: 8 tokens, not 77


def test_prompts_projected_once_per_block_per_step(monkeypatch):
    import fastdpl.prompt as prompt_module

    calls = []
    real = prompt_module.project_prompts
    monkeypatch.setattr(prompt_module, "project_prompts", lambda block, p: calls.append(p.shape) or real(block, p))
    dpl = FastDPLPrompt(tiny_clip(), CLASSNAMES, impl="eager", text_chunk_size=2)
    dpl.train()
    dpl(_images(batch=4)).sum().backward()
    assert len(calls) == 6  # 3 image blocks + 3 text blocks, whatever the batch and the 3 text chunks


# ---- the wrapped model stays untouched --------------------------------------------------------------

def test_wrapping_keeps_model_forward_state_dict_and_storage():
    model = tiny_clip()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    images = _images()
    import open_clip

    texts = open_clip.tokenize(["a photo of a cat."])
    with torch.no_grad():
        expected = model(images, texts)
    dpl = FastDPLPrompt(model, CLASSNAMES, impl="eager")
    _randomize(dpl)
    dpl(images).sum().backward()
    assert dpl.model is model
    assert set(model.state_dict()) == set(before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.data_ptr() == pointers[k], k
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        for a, b in zip(model(images, texts), expected):
            assert torch.equal(a, b)


# ---- API ---------------------------------------------------------------------------------------------

def test_api_shapes_and_parameter_groups():
    dpl = FastDPLPrompt(tiny_clip(), CLASSNAMES, candidate_lengths=(0, 1, 4), impl="eager")
    assert dpl.arch_logits["image"].shape == (3, 3) and dpl.arch_logits["text"].shape == (3, 3)
    assert dpl.prompt("image", 2, 4).shape == (4, 64) and dpl.prompt("text", 0, 1).shape == (1, 48)
    with pytest.raises(KeyError):
        dpl.prompt("text", 0, 0)
    arch, prompts = dpl.arch_parameters(), dpl.prompt_parameters()
    assert len(arch) == 2 and len(prompts) == 2 * 3 * 2
    assert not {id(p) for p in arch} & {id(p) for p in prompts}
    trainable = {id(p) for p in dpl.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in arch + prompts}
    assert dpl(_images()).shape == (3, len(CLASSNAMES))


def test_derive_config_is_argmax_and_builds_subnet():
    dpl = FastDPLPrompt(tiny_clip(), CLASSNAMES, candidate_lengths=(0, 2, 5), impl="eager")
    with torch.no_grad():
        dpl.arch_logits["image"].copy_(torch.tensor([[0., 1, 0], [3, 0, 0], [0, 0, 2]]))
        dpl.arch_logits["text"].copy_(torch.tensor([[0., 0, 1], [0, 1, 0], [1, 0, 0]]))
    config = dpl.derive_config()
    assert config.lengths == {"image": (2, 0, 5), "text": (5, 2, 0)}
    subnet = FastDPLPrompt(dpl.model, CLASSNAMES, mode="fixed", config=config, impl="eager")
    assert subnet.prompt("image", 2, 5).shape == (5, 64)
    assert subnet(_images()).shape == (3, len(CLASSNAMES))


def test_prompt_config_json_table_and_presets(tmp_path):
    config = PromptConfig({"image": (6, 0, 2), "text": (1, 1, 0)})
    path = config.save(tmp_path / "sub" / "config.json")
    assert PromptConfig.load(path) == config
    assert json.loads(path.read_text())["lengths"] == {"image": [6, 0, 2], "text": [1, 1, 0]}
    table = str(config)
    assert "block | image |  text" in table and "total |     8 |     2" in table
    assert PromptConfig.uniform(2, 2, num_blocks=3).lengths == {"image": (2, 2, 0), "text": (2, 2, 0)}
    assert PromptConfig.zero_shot(3).lengths == {"image": (0, 0, 0), "text": (0, 0, 0)}
    with pytest.raises(ValueError, match=r"^PromptConfig: unknown tower 'audio'; expected one of"):
        PromptConfig({"audio": (1,)})
    with pytest.raises(ValueError, match="length must be an int >= 0"):
        PromptConfig({"text": (1, -2)})
    with pytest.raises(FileNotFoundError):
        PromptConfig.load(tmp_path / "missing.json")


def test_prompt_state_dict_round_trip_and_mismatches():
    model = tiny_clip()
    dpl = FastDPLPrompt(model, CLASSNAMES, candidate_lengths=(0, 1, 3), impl="eager")
    _randomize(dpl)
    state = dpl.prompt_state_dict()
    assert all(not k.startswith("model") for k in state["prompts"])
    size = sum(v.numel() for group in ("prompts", "arch_logits") for v in state[group].values())
    assert size == sum(p.numel() for p in dpl.arch_parameters() + dpl.prompt_parameters())
    fresh = FastDPLPrompt(model, CLASSNAMES, candidate_lengths=(0, 1, 3), impl="eager",
                          generator=torch.Generator().manual_seed(99))
    fresh.load_prompt_state_dict(state)
    images = _images()
    assert torch.equal(fresh(images), dpl(images))

    other_backbone = FastDPLPrompt(tiny_clip(width=64, heads=4), CLASSNAMES, candidate_lengths=(0, 1, 3))
    with pytest.raises(ValueError, match="backbone mismatch"):
        other_backbone.load_prompt_state_dict(state)
    other_lengths = FastDPLPrompt(model, CLASSNAMES, candidate_lengths=(0, 2, 3))
    with pytest.raises(ValueError, match="candidate_lengths mismatch"):
        other_lengths.load_prompt_state_dict(state)
    fixed = FastDPLPrompt(model, CLASSNAMES, mode="fixed", config=PromptConfig.uniform(1, 3))
    with pytest.raises(ValueError, match="mode mismatch"):
        fixed.load_prompt_state_dict(state)


def test_paper_and_normal_initialisations():
    model = tiny_clip()
    normal = FastDPLPrompt(model, CLASSNAMES, candidate_lengths=(0, 6))
    paper = FastDPLPrompt(model, CLASSNAMES, candidate_lengths=(0, 6), init="paper")
    stacked = lambda dpl, tower: torch.cat([p for k, p in dpl.prompts.items() if k.startswith(tower)])  # noqa
    assert 0.015 < stacked(normal, "image").std() < 0.025 and 0.015 < stacked(normal, "text").std() < 0.025
    assert 0.85 < stacked(paper, "image").std() < 1.15 and stacked(paper, "image").min() < 0
    text = stacked(paper, "text")
    assert text.min() >= 0 and text.max() < 1 and 0.4 < text.mean() < 0.6


def test_set_impl_switches_engine(monkeypatch):
    import fastdpl.adapters.base as towers

    seen = []
    real = towers.mixture_prefix_attention
    monkeypatch.setattr(towers, "mixture_prefix_attention",
                        lambda *a, impl, **k: seen.append(impl) or real(*a, impl=impl, **k))
    dpl = FastDPLPrompt(tiny_clip(), CLASSNAMES, impl="eager")
    images = _images()
    eager = dpl(images)
    dpl.set_impl("reference")
    reference = dpl(images)
    assert set(seen) == {"eager", "reference"}
    assert normalised_error(eager, reference) < 1e-5
    with pytest.raises(ValueError, match="impl must be one of"):
        dpl.set_impl("cuda")


def test_text_features_cached_in_eval_without_grad(monkeypatch):
    import fastdpl.prompt as prompt_module

    calls = []
    real = prompt_module.FastDPLPrompt.encode_text_embeddings
    monkeypatch.setattr(prompt_module.FastDPLPrompt, "encode_text_embeddings",
                        lambda self, *a: calls.append(1) or real(self, *a))
    dpl = FastDPLPrompt(tiny_clip(), CLASSNAMES, impl="eager").eval()
    with torch.no_grad():
        first = dpl.encode_text()
        assert torch.equal(dpl.encode_text(), first) and len(calls) == 1
        dpl.prompt("text", 1, 3).add_(1.0)  # an optimiser step on a text prompt
        changed = dpl.encode_text()
    assert len(calls) == 2 and not torch.equal(changed, first)
    dpl.encode_text()  # grad enabled and text prompts need grad: never cached
    dpl.train()
    with torch.no_grad():
        dpl.encode_text()
    assert len(calls) == 4


def test_chunked_text_with_checkpointing_equals_unchunked():
    model = tiny_clip()
    whole = FastDPLPrompt(model, CLASSNAMES, impl="eager")
    chunked = FastDPLPrompt(model, CLASSNAMES, impl="eager", text_chunk_size=2)
    _randomize(whole)
    chunked.load_prompt_state_dict(whole.prompt_state_dict())
    images = _images()
    logits, grads = _logits_and_grads(whole, whole, images)
    chunk_logits, chunk_grads = _logits_and_grads(chunked, chunked, images)
    # Equal up to fp32 rounding: each chunk is truncated to its own longest text.
    assert normalised_error(chunk_logits, logits) < 1e-5
    for g, r in zip(chunk_grads, grads):
        assert normalised_error(g, r) < 1e-5


def _saved_activation_bytes(dpl, images) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of one step's loss."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = dpl(images).logsumexp(1).mean()
    loss.backward()
    return sum(storages.values())


def test_chunked_text_keeps_a_fraction_of_the_activations_at_1000_classes():
    """What lets a 1000-class step fit where a plain one would not: with chunks of 100 classes and
    activation checkpointing, the step holds for backward only the chunks' inputs, not every block's
    activations over all 1000 class texts."""
    model = tiny_clip()
    names = [f"class number {i}" for i in range(1000)]
    plain = FastDPLPrompt(model, names, impl="eager", candidate_lengths=(0, 2))
    chunked = FastDPLPrompt(model, names, impl="eager", candidate_lengths=(0, 2), text_chunk_size=100)
    images = _images(batch=2)
    full, small = _saved_activation_bytes(plain, images), _saved_activation_bytes(chunked, images)
    assert small < 0.2 * full, (small, full)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """The whole module under torch.compile: Dynamo captures it and AOT autograd runs its
    backward, giving eager's logits and gradients. The backend is aot_eager, not inductor:
    inductor's lowering of the op (the one piece that is ours) is tested at the op level
    (test_op_api's fullgraph tests, both engines); here it would only add the C++ code
    generation of CLIP's own layers, about 60 s of a cold CPU run."""
    dpl = FastDPLPrompt(tiny_clip(), CLASSNAMES[:3], candidate_lengths=(0, 2, 3), impl="eager").train()
    _randomize(dpl)
    images = _images()
    expected, expected_grads = _logits_and_grads(dpl, dpl, images)
    compiled = torch.compile(dpl, backend="aot_eager")
    actual, actual_grads = _logits_and_grads(compiled, dpl, images)
    assert normalised_error(actual, expected) < 1e-5
    for g, r in zip(actual_grads, expected_grads):
        assert normalised_error(g, r) < 1e-4


# ---- NVTX --------------------------------------------------------------------------------------------

def test_nvtx_ranges_pushed_and_popped_in_pairs_when_enabled(monkeypatch):
    events = []
    monkeypatch.setattr(profiling, "_push", lambda name: events.append(("push", name)))
    monkeypatch.setattr(profiling, "_pop", lambda: events.append(("pop", None)))
    dpl = FastDPLPrompt(tiny_clip(), CLASSNAMES, impl="eager")
    monkeypatch.setattr(profiling, "_enabled", False)
    dpl(_images())
    assert events == []
    profiling.enable_nvtx(True)
    try:
        dpl(_images())
    finally:
        profiling.enable_nvtx(False)
    names = [name for kind, name in events if kind == "push"]
    assert {"fastdpl/image/block2", "fastdpl/text/block0/attn", "fastdpl/text/block0/mlp"} <= set(names)
    depth = 0
    for kind, _ in events:
        depth += 1 if kind == "push" else -1
        assert depth >= 0
    assert depth == 0


def test_nvtx_env_variable_enables(monkeypatch):
    import importlib
    import subprocess
    import sys

    code = "import fastdpl.profiling as p; print(p.nvtx_enabled())"
    for value, expected in (("1", "True"), ("0", "False")):
        out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "FASTDPL_NVTX": value},
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == expected, out.stderr
    importlib.reload(profiling)


# ---- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("images,match", [
    (torch.randn(2, 3, 16, 16), "32x32"),
    (torch.randn(2, 1, 32, 32), r"shape \(B, 3, H, W\)"),
    (torch.randn(3, 32, 32), r"shape \(B, 3, H, W\)"),
])
def test_bad_images_raise(images, match):
    dpl = FastDPLPrompt(tiny_clip(), CLASSNAMES, impl="eager")
    with pytest.raises(ValueError, match=match):
        dpl(images)


@pytest.mark.parametrize("kwargs,match", [
    (dict(classnames=[]), "classnames is empty"),
    (dict(classnames="cat"), "classnames must be a list"),
    (dict(classnames=["cat", ""]), "non-empty strings"),
    (dict(candidate_lengths=()), "candidate_lengths must name at least one candidate"),
    (dict(candidate_lengths=(0, 2, 2)), "candidate_lengths must be distinct"),
    (dict(candidate_lengths=(0, -1)), "candidate_lengths must be non-negative"),
    (dict(towers=("image", "audio")), "towers must be distinct names"),
    (dict(mode="fixed"), "needs config=PromptConfig"),
    (dict(mode="fixed", config=PromptConfig.uniform(2, 4)), "has 4 block lengths but the model's image tower has 3"),
    (dict(mode="fixed", config=PromptConfig({"text": (1, 2)})), "'text' has 2 block lengths"),
    (dict(mode="supernet"), "mode must be one of"),
    (dict(init="xavier"), "init must be one of"),
    (dict(text_chunk_size=0), "text_chunk_size must be a positive int"),
])
def test_bad_arguments_raise(kwargs, match):
    kwargs = {"classnames": CLASSNAMES, **kwargs}
    classnames = kwargs.pop("classnames")
    with pytest.raises(ValueError, match=match):
        FastDPLPrompt(tiny_clip(), classnames, **kwargs)


def test_class_slices_select_what_python_slices_select():
    """encode_text(classes) for open, negative and out-of-range bounds: the rows of the whole
    encode_text that the same slice of a list of the classes picks (its own arithmetic, not
    slice.indices: torch 2.11's Dynamo cannot trace that); an empty or strided one is refused."""
    dpl = FastDPLPrompt(tiny_clip(), CLASSNAMES[:5], mode="fixed", config=PromptConfig.uniform(1, 2, 3), impl="eager")
    every = dpl.encode_text().detach()
    for start, stop in ((None, None), (1, None), (None, -1), (-3, 4), (-9, 2), (3, 99), (-1, None)):
        rows = list(range(5))[start:stop]
        assert_matches(dpl.encode_text(slice(start, stop)).detach(), every[rows], 1e-5, f"slice({start}, {stop})")
    for bad in (slice(3, 3), slice(-1, -2), slice(0, 4, 2)):
        with pytest.raises(ValueError, match="^classes"):
            dpl.encode_text(bad)


def test_unsupported_towers_are_refused():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    text_cfg = CLIPTextCfg(context_length=77, vocab_size=49408, width=48, heads=3, layers=2)
    resnet = open_clip.CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, image_size=32),
                            text_cfg=text_cfg)
    with pytest.raises(UnsupportedModelError, match="image tower ModifiedResNet is unsupported"):
        FastDPLPrompt(resnet, CLASSNAMES)
    custom = open_clip.CLIP(
        embed_dim=32, vision_cfg=CLIPVisionCfg(image_size=32, patch_size=8, width=64, head_width=16, layers=2),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=48, heads=3, layers=2, block_type="custom"))
    with pytest.raises(UnsupportedModelError, match="custom attention blocks are not supported"):
        FastDPLPrompt(custom, CLASSNAMES)


def test_prompt_files_saved_before_the_core_still_load_and_give_their_logits():
    """tests/data/prompts-v1-tiny.pt: search and fixed states saved by fastdpl before the core
    (commit 23c52b7), with the logits that code computed on the saved images."""
    from pathlib import Path

    from fastdpl import load_clip

    saved = torch.load(Path(__file__).parent / "data" / "prompts-v1-tiny.pt", weights_only=False)
    model = load_clip("tiny")
    search = FastDPLPrompt(model, saved["classnames"], candidate_lengths=saved["search"]["candidate_lengths"],
                           impl="eager", generator=torch.Generator().manual_seed(0))
    search.load_prompt_state_dict(saved["search"])
    fixed = FastDPLPrompt(model, saved["classnames"], mode="fixed",
                          config=PromptConfig.from_dict(saved["fixed"]["config"]), impl="eager")
    fixed.load_prompt_state_dict(saved["fixed"])
    with torch.no_grad():
        for module, logits in ((search, saved["search_logits"]), (fixed, saved["fixed_logits"])):
            assert normalised_error(module(saved["images"]), logits) < 1e-6
    assert search.prompt_state_dict().keys() == saved["search"].keys()  # the same format is written
