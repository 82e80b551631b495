"""Fidelity to the authors' protocols (docs/fidelity.md): TPT's AugMix views, the alpha step's
validation batches, the text input of each stage, the initialisations, the authors' saved alpha.

References are written here from the authors' published formulas and from open_clip's own
modules, not from fastdpl's code.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from fastdpl import FastDPLPrompt, PromptConfig
from fastdpl.data.augmix import OPS, augmix
from fastdpl.data.images import CLIP_MEAN, CLIP_STD, clip_transform
from fastdpl.pipeline import stages, training
from fastdpl.pipeline.config import RunConfig
from fastdpl.pipeline.demo import demo_config
from fastdpl.templates import IMAGENET_TEMPLATES, resolve_template
from fastdpl.tpt import TPTViews
from helpers import CLASSNAMES, normalised_error, tiny_clip


def _image(seed=0, size=(40, 30)):
    pixels = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.numpy())


# ---- 1. TPT views ------------------------------------------------------------------------------------
def _draws(name, size=(224, 224), count=4000):
    op = next(op for op in OPS if op.name == name)
    rng = np.random.default_rng(0)
    return [op.draw(rng, 1, size) for _ in range(count)]


def test_augmix_ops_are_tpts_nine_with_their_severity_1_ranges():
    assert [op.name for op in OPS] == ["autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x",
                                       "shear_y", "translate_x", "translate_y"]
    # AugMix's scaling at severity 1: level ~ U(0.1, 1); int ops int(level * max / 10), float ops level * max / 10.
    assert set(_draws("posterize")) == {4}                     # 4 - int(level * 0.4) bits
    assert set(_draws("rotate")) == {-2, -1, 0, 1, 2}          # ±int(level * 3) degrees
    solarize = _draws("solarize")                              # 256 - int(level * 25.6)
    assert min(solarize) == 231 and max(solarize) == 254
    for name in ("shear_x", "shear_y"):                        # ±level * 0.03
        shear = np.array(_draws(name))
        assert (np.abs(shear) >= 0.003).all() and (np.abs(shear) < 0.03).all() and (shear < 0).any()
    for name, axis in (("translate_x", 0), ("translate_y", 1)):  # ±int(level * size / 30) pixels
        assert set(_draws(name)) == set(range(-7, 8))
        size = [224, 224]
        size[axis] = 448
        assert max(map(abs, _draws(name, tuple(size)))) == 14


def test_augmix_ops_apply_what_they_draw():
    image = _image(1, (64, 64))
    rng = np.random.default_rng(3)
    expected = {"rotate": lambda img, p: img.rotate(p, resample=Image.BILINEAR),
                "shear_x": lambda img, p: img.transform(img.size, Image.AFFINE, (1, p, 0, 0, 1, 0), Image.BILINEAR),
                "translate_y": lambda img, p: img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, p),
                                                            Image.BILINEAR)}
    for op in OPS:
        if op.name in expected:
            p = op.draw(rng, 1, image.size)
            assert np.array_equal(np.asarray(op.apply(image, p)), np.asarray(expected[op.name](image, p)))


def test_augmix_mix_is_convex_over_chains_of_one_to_three_ops():
    class Counting:  # an identity op that records how often each chain calls it
        def __init__(self):
            self.calls = 0

        def __call__(self, image, rng, severity):
            self.calls += 1
            return image

    preprocess = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    crop = _image(2, (32, 32))
    counts, rng = set(), np.random.default_rng(0)
    for _ in range(200):
        op = Counting()
        mixed = augmix(crop, preprocess, rng, ops=[op])
        # m * x + (1 - m) * sum_i w_i * x == x: the weights are convex (Dirichlet, Beta)
        torch.testing.assert_close(mixed, preprocess(crop), rtol=0, atol=1e-5)
        counts.add(op.calls)
    assert counts <= set(range(3, 10)) and min(counts) == 3 and max(counts) >= 8  # 3 chains of 1..3 ops


@pytest.mark.parametrize("augmix_views", [False, True])
def test_tpt_random_views_are_bilinear_random_resized_crops_with_flips(augmix_views):
    image, size = _image(4), 32
    views = TPTViews(size, views=5, augmix=augmix_views)(image, seed=7)
    torch.testing.assert_close(views[0], clip_transform(size, train=False)(image))  # the test preprocessing
    if augmix_views:
        assert not torch.equal(views[1:], TPTViews(size, views=5)(image, seed=7)[1:])
        return
    # torchvision's defaults (scale 0.08-1, ratio 3/4-4/3, bilinear) drawn from the same seed, as TPT calls them
    torch.manual_seed(7)
    crop = T.Compose([T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BILINEAR),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    expected = torch.stack([crop(image) for _ in range(4)])
    assert torch.equal(views[1:], expected)


def test_tpt_views_refuse_a_bad_severity():
    with pytest.raises(ValueError, match="severity must be in"):
        TPTViews(32, severity=0)


# ---- 2. the alpha step's validation batches ----------------------------------------------------------
def _alpha_batches(tmp_path, monkeypatch, **settings):
    seen = []
    monkeypatch.setattr(training, "arch_step", lambda net, opt, images, labels, job, **_: seen.append((images, labels)))
    assert RunConfig().val_batch_size == 16  # the authors' TEST.BATCH_SIZE is fastdpl's default
    cfg = demo_config(shots=4, search_epochs=1, batch_size=4, output=str(tmp_path / "run"), resume=False,
                      progress=False, val_batch_size=16, **settings)
    stages.run_search(cfg)
    return seen, stages.prepare(cfg)


def _test_view(job, sample):
    return clip_transform(job.image_size, train=False)(sample.image if isinstance(sample.image, Image.Image)
                                                        else Image.open(sample.image))


def test_alpha_steps_read_the_first_validation_batch_with_test_transforms(tmp_path, monkeypatch):
    seen, job = _alpha_batches(tmp_path, monkeypatch, val_batches="first")
    first = job.splits.val[:16]
    expected = torch.stack([_test_view(job, s) for s in first])
    assert len(seen) == 10  # 40 training images in batches of 4: one alpha step each
    for images, labels in seen:
        assert torch.equal(images, expected) and labels.tolist() == [s.label for s in first]


def test_alpha_steps_cycle_through_reshuffled_validation_batches_of_16(tmp_path, monkeypatch):
    seen, job = _alpha_batches(tmp_path, monkeypatch)
    views = torch.stack([_test_view(job, s) for s in job.splits.val])  # 40 images: batches 16, 16, 8, 16, ...
    assert [len(labels) for _, labels in seen] == [16, 16, 8, 16, 16, 8, 16, 16, 8, 16]
    positions = []
    for images, labels in seen[:3]:  # one pass: every validation image once, test-preprocessed
        for image, label in zip(images, labels):
            match = [i for i in range(len(views)) if torch.equal(views[i], image)]
            assert len(match) == 1 and job.splits.val[match[0]].label == label
            positions += match
    assert sorted(positions) == list(range(40)) and positions != list(range(40))  # shuffled
    assert not torch.equal(seen[0][0], seen[3][0])  # the next pass is reshuffled


def test_a_validation_split_smaller_than_one_batch_per_process_is_an_error(tmp_path):
    from fastdpl.pipeline.loaders import cycle_batches, make_loader
    from fastdpl.pipeline.runtime import Dist

    two_ranks = Dist(rank=0, world=2)
    loader = make_loader([stages.load_dataset("builtin:digits").val[0]] * 5, 32, 4, 0, two_ranks, False, 0)
    with pytest.raises(ValueError, match="5 images make no full batch of 4 per process on 2 processes"):
        next(cycle_batches(loader, 0))


# ---- 3. the text input -------------------------------------------------------------------------------
def _literal_ensemble_text_features(model, classnames, templates):
    """open_clip's own modules: the mean token embedding over the templates, the last template's
    end-of-text position, the model's causal transformer, ln_final and projection."""
    import open_clip

    tokens = [open_clip.tokenize([t.format(c.replace("_", " ")) for c in classnames]) for t in templates]
    x = torch.stack([model.token_embedding(t) for t in tokens]).mean(0) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    return x[torch.arange(len(classnames)), tokens[-1].argmax(-1)] @ model.text_projection


def test_ensemble_text_input_equals_a_literal_open_clip_implementation():
    model = tiny_clip(seed=3)
    dpl = FastDPLPrompt(model, CLASSNAMES, mode="fixed", config=PromptConfig.zero_shot({"image": 3, "text": 3}),
                        template="ensemble")
    assert dpl.templates == IMAGENET_TEMPLATES and len(IMAGENET_TEMPLATES) == 60
    with torch.no_grad():
        literal = _literal_ensemble_text_features(model, CLASSNAMES, IMAGENET_TEMPLATES)
        single = _literal_ensemble_text_features(model, CLASSNAMES, IMAGENET_TEMPLATES[:1])
        assert normalised_error(dpl.encode_text(), literal) < 1e-5
        # not vacuous: the ensemble input is far from the first template's alone
        assert normalised_error(single, literal) > 1e-2
    # a list of templates is an ensemble the same way
    pair = FastDPLPrompt(model, CLASSNAMES, mode="fixed", config=PromptConfig.zero_shot({"image": 3, "text": 3}),
                         template=["a bad photo of a {}.", "itap of the {}."])
    with torch.no_grad():
        assert normalised_error(pair.encode_text(), _literal_ensemble_text_features(
            model, CLASSNAMES, ["a bad photo of a {}.", "itap of the {}."])) < 1e-5


def test_ensemble_with_text_prompts_matches_the_literal_supernet_with_gradients():
    from fastdpl.literal import literal_logits

    model = tiny_clip(seed=4)
    dpl = FastDPLPrompt(model, CLASSNAMES, candidate_lengths=(0, 2, 3), template="ensemble", impl="eager")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in dpl.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
    images = torch.randn(2, 3, 32, 32, generator=gen)
    params = dpl.arch_parameters() + dpl.prompt_parameters()
    fast, ref = dpl(images), literal_logits(dpl, images)
    assert normalised_error(fast, ref) < 1e-4
    for g, r in zip(torch.autograd.grad(fast.sum(), params), torch.autograd.grad(ref.sum(), params)):
        assert r.abs().max() > 0 and normalised_error(g, r) < 1e-4


def test_templates_resolve_by_name_and_dataset():
    assert resolve_template("default") == ("a photo of a {}.",)
    assert resolve_template("custom", "dtd") == ("a texture of {}.",)
    assert resolve_template("custom", "flowers") == ("a type of flower, a photo of a {}.",)
    for bad, match in (("custom", "no hand-written template for dataset 'builtin:digits'"),
                       ("a photo", "format string with one"), ([], "non-empty list")):
        with pytest.raises(ValueError, match=match):
            resolve_template(bad, "builtin:digits")


def test_each_stage_uses_the_authors_text_input_by_default(tmp_path):
    cfg = demo_config(template="auto", output=str(tmp_path / "run"))
    assert stages.stage_template(cfg, "search") == "default"
    assert stages.stage_template(cfg, "train") == "ensemble"
    assert stages.stage_template(cfg, "tpt") == "default"
    assert stages.stage_template(cfg, "zeroshot") == "default"  # the digits have no hand-written template
    assert stages.stage_template(demo_config(template="auto", dataset="dtd"), "zeroshot") == "custom"
    assert stages.stage_template(demo_config(template="ensemble"), "search") == "ensemble"
    # the train stage builds its subnet on the ensemble and records it with the prompts
    cfg = demo_config(template="auto", shots=1, train_epochs=1, output=str(tmp_path / "run"), progress=False,
                      prompt_config="uniform:1:2", resume=False)
    stages.run_train(cfg)
    saved = torch.load(tmp_path / "run" / "train" / "prompts.pt", weights_only=False)
    assert saved["template"] == "ensemble"
    job = stages.prepare(cfg, "eval")
    dpl = stages._load_prompted(job, None)[0]
    assert dpl.templates == IMAGENET_TEMPLATES  # eval rebuilds the prompts with the input they were trained on


# ---- 4. initialisations ------------------------------------------------------------------------------
def test_init_paper_applies_to_the_search_stage_only(tmp_path):
    job = stages.prepare(demo_config(init="paper", output=str(tmp_path / "run")))
    search = stages.build_dpl(job, job.splits.classnames, "search")
    image = torch.cat([p.flatten() for k, p in search.prompts.items() if k.startswith("image")])
    text = torch.cat([p.flatten() for k, p in search.prompts.items() if k.startswith("text")])
    assert 0.9 < image.std() < 1.1 and text.min() >= 0 and text.max() < 1 and 0.45 < text.mean() < 0.55
    fixed = stages.build_dpl(job, job.splits.classnames, "fixed", PromptConfig.uniform(4, 4, 4))
    values = torch.cat([p.flatten() for p in fixed.prompt_parameters()])
    assert 0.018 < values.std() < 0.022 and abs(values.mean()) < 0.003  # N(0, 0.02^2): the authors' train stage


# ---- 5. the authors' saved alpha ---------------------------------------------------------------------
def _authors_run(folder, epochs=(1, 80), seed=0):
    """Files as the authors' save_alpha writes them: the image alpha under _txt, the text alpha under _img."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for epoch in epochs:
        image, text = rng.normal(size=(12, 7)).astype(np.float32), rng.normal(size=(12, 7)).astype(np.float32)
        np.save(folder / f"alpha_e{epoch}_txt.npy", image)
        np.save(folder / f"alpha_e{epoch}_img.npy", text)
        arrays[epoch] = image, text
    return arrays


def test_authors_alpha_files_are_read_the_right_way_round(tmp_path):
    arrays = _authors_run(tmp_path / "out")
    image, text = arrays[80]
    config = PromptConfig.from_authors_alpha(tmp_path / "out")  # the highest epoch
    assert config.lengths == {"image": tuple(int(np.argmax(r)) for r in image),
                              "text": tuple(int(np.argmax(r)) for r in text)}
    assert config.lengths["image"] != config.lengths["text"]  # the swap is visible
    assert PromptConfig.from_authors_alpha(tmp_path / "out" / "alpha_e80_img.npy") == config
    early = PromptConfig.from_authors_alpha(tmp_path / "out", epoch=1)
    assert early.lengths["image"] == tuple(int(np.argmax(r)) for r in arrays[1][0])
    straight = PromptConfig.from_authors_alpha(tmp_path / "out", swapped=False)
    assert straight.lengths == {"image": config.lengths["text"], "text": config.lengths["image"]}


def test_authors_alpha_errors_name_the_file(tmp_path):
    _authors_run(tmp_path / "out", epochs=(3,))
    (tmp_path / "out" / "alpha_e3_img.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"alpha_e3_img\.npy is missing"):
        PromptConfig.from_authors_alpha(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no alpha_e"):
        PromptConfig.from_authors_alpha(tmp_path / "empty")
    np.save(tmp_path / "out" / "alpha_e3_img.npy", np.zeros(7))
    with pytest.raises(ValueError, match=r"alpha_e3_img\.npy: expected a \(blocks, candidates\)"):
        PromptConfig.from_authors_alpha(tmp_path / "out")
    (tmp_path / "out" / "alpha_e3_img.npy").write_text("not numpy")
    with pytest.raises(ValueError, match="not a NumPy array file"):
        PromptConfig.from_authors_alpha(tmp_path / "out")


def test_import_alpha_command_and_training_from_the_authors_folder(tmp_path):
    arrays = _authors_run(tmp_path / "out", epochs=(2,))
    out = tmp_path / "config.json"
    run = lambda *a: subprocess.run([sys.executable, "-m", "fastdpl.cli", "import-alpha", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    done = run(str(tmp_path / "out"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    lengths = json.loads(out.read_text())["lengths"]
    assert lengths["image"] == [int(np.argmax(r)) for r in arrays[2][0]]
    again = run(str(tmp_path / "out"), "--out", str(out))
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
    # --prompt-config takes the authors' folder directly (a 4-block model: their 12-block alpha is refused)
    job = stages.prepare(demo_config(prompt_config=str(tmp_path / "out"), output=str(tmp_path / "run")), "train")
    config, method = stages.resolve_prompt_config(job)
    assert config.lengths["image"] == tuple(lengths["image"]) and method == "dpl"
    with pytest.raises(ValueError, match="has 12 block lengths but the model's image tower has 4 blocks"):
        stages.build_dpl(job, job.splits.classnames, "fixed", config)
