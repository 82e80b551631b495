"""Test-time prompt tuning: the objective against float64 formulas, the fast path against the literal
per-image loop, no leaks between images, batched == one at a time, views, bad input, the CLI stage."""
import json

import pytest
import torch

from fastdpl import FastDPLPrompt, PromptConfig, TestTimePromptTuner, load_clip
from fastdpl.literal import literal_tpt_predict
from fastdpl.tpt import TPTViews, average_entropy, confident_views, view_entropies

from helpers import CLASSNAMES, assert_matches


def _entropy64(p):
    return -(p * torch.log(p)).sum(-1)


@pytest.mark.parametrize("views,classes,keep", [(64, 10, 0.1), (16, 1000, 0.1), (7, 3, 0.5), (5, 4, 0.01)])
def test_selection_and_average_entropy_against_float64(views, classes, keep):
    g = torch.Generator().manual_seed(views * classes)
    logits = (torch.randn(3, views, classes, generator=g) * torch.rand(3, views, 1, generator=g) * 8).double()
    p = torch.softmax(logits, -1)
    entropy = _entropy64(p)
    assert_matches(view_entropies(logits), entropy, 1e-12, "view entropies")  # same maths, float64
    k = max(1, int(views * keep))
    chosen = confident_views(logits, keep)
    assert chosen.shape == (3, k)
    for row in range(3):
        assert sorted(chosen[row].tolist()) == sorted(torch.argsort(entropy[row])[:k].tolist())
        kept = logits[row, chosen[row]]
        reference = _entropy64(torch.softmax(kept, -1).mean(0))
        assert average_entropy(kept).item() == pytest.approx(reference.item(), rel=1e-12)


def test_ties_single_view_and_extreme_logits():
    tied = torch.zeros(6, 4)
    tied[3] = torch.tensor([5.0, 0, 0, 0])  # the one confident view
    assert confident_views(tied, 0.5).tolist() == [3, 0, 1]  # then ties in order
    one = torch.randn(1, 9)
    assert average_entropy(one).item() == pytest.approx(view_entropies(one)[0].item(), rel=1e-6)
    # Very confident views that disagree: the mean is 50/50, entropy log 2, no underflow to nan.
    extreme = torch.tensor([[1e4, -1e4], [-1e4, 1e4]])
    assert average_entropy(extreme).item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"^keep_fraction must be in \(0, 1\], got 0\.0$"):
        confident_views(tied, 0.0)


@pytest.fixture(scope="module")
def tiny():
    return load_clip("tiny")


@pytest.fixture(scope="module")
def tiny64():
    """The tiny CLIP in float64: fast and literal paths must then agree to rounding."""
    return load_clip("tiny").double()


def _dpl(model, config, template="a photo of a {}."):
    return FastDPLPrompt(model, CLASSNAMES[:7], mode="fixed", config=config, template=template,
                         generator=torch.Generator().manual_seed(3)).eval()


CONFIGS = {
    "context": PromptConfig.zero_shot(4),
    "text_prompts": PromptConfig({"image": (1, 0, 2, 0), "text": (2, 0, 3, 1)}),
}


@pytest.mark.parametrize("tune", ["context", "text_prompts"])
@pytest.mark.parametrize("steps", [1, 2])
def test_fast_path_equals_literal_per_image_tpt(tiny64, tune, steps):
    dpl = _dpl(tiny64, CONFIGS[tune])
    tuner = TestTimePromptTuner(dpl, tune=tune, keep_fraction=0.25, lr=0.05, steps=steps)
    views = torch.randn(2, 8, 3, 32, 32, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    for image in views:
        fast = tuner.predict(image[None])[0]
        literal = literal_tpt_predict(tuner, image)
        assert_matches(fast, literal, 1e-9, f"tpt {tune} x{steps}: fast vs literal")
        with torch.no_grad():
            untuned = dpl(image[:1])[0]
        assert (fast - untuned).abs().max() > 1e-2  # the step did change the prediction's logits


@pytest.mark.parametrize("tune", ["context", "text_prompts"])
def test_no_state_leaks_and_batched_equals_one_at_a_time(tiny64, tune):
    dpl = _dpl(tiny64, CONFIGS[tune])
    before = {k: v.clone() for k, v in dpl.prompt_state_dict()["prompts"].items()}
    tuner = TestTimePromptTuner(dpl, tune=tune, keep_fraction=0.2, lr=0.05)
    views = torch.randn(3, 10, 3, 32, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    first = tuner.predict(views[:1])
    tuner.predict(views[1:])
    assert torch.equal(tuner.predict(views[:1]), first)
    for k, v in dpl.prompt_state_dict()["prompts"].items():
        assert torch.equal(v, before[k])
    singles = torch.cat([tuner.predict(views[i:i + 1]) for i in range(3)])
    assert_matches(tuner.predict(views), singles, 1e-12, "batched vs one at a time")


def test_initial_context_is_the_templates_own_words(tiny64):
    from fastdpl.literal import literal_encode_text

    dpl = _dpl(tiny64, CONFIGS["context"])
    tuner = TestTimePromptTuner(dpl, tune="context")
    assert tuner.initial["context"].shape == (4, 48)  # "a photo of a": 4 tokens, text width 48
    with torch.no_grad():
        assert_matches(literal_encode_text(dpl, tuner.initial["context"]), dpl.encode_text(), 1e-12, "literal")
        assert_matches(tuner.encode_text(dict(context=tuner.initial["context"][None]))[0], dpl.encode_text(),
                       1e-12, "context")


def test_tuner_bad_input(tiny):
    zero_shot = _dpl(tiny, CONFIGS["context"])
    with pytest.raises(ValueError, match="no text prompts"):
        TestTimePromptTuner(zero_shot, tune="text_prompts")
    with pytest.raises(ValueError, match=r"^keep_fraction must be in \(0, 1\], got 1\.5$"):
        TestTimePromptTuner(zero_shot, keep_fraction=1.5)
    with pytest.raises(ValueError, match=r"^steps must be a positive int, got 0$"):
        TestTimePromptTuner(zero_shot, steps=0)
    with pytest.raises(ValueError, match=r"^tune must be one of \(.*'text_prompts'\), got 'image'$"):
        TestTimePromptTuner(zero_shot, tune="image")
    with pytest.raises(ValueError, match="must start with these words"):
        TestTimePromptTuner(_dpl(tiny, CONFIGS["context"], "itap of a {}."), context="a photo of a")
    with pytest.raises(ValueError, match="mode='fixed'"):
        TestTimePromptTuner(FastDPLPrompt(tiny, ["a", "b"], candidate_lengths=[0, 1]))
    with pytest.raises(ValueError, match=r"views must be a \(G, V, 3, S, S\)"):
        TestTimePromptTuner(zero_shot).predict(torch.randn(8, 3, 32, 32))


def test_views_are_seeded_and_the_first_is_the_test_preprocessing():
    from PIL import Image

    from fastdpl.data.images import clip_transform

    image = Image.fromarray(torch.randint(0, 256, (40, 30, 3), dtype=torch.uint8).numpy())
    for augmix in (False, True):
        views = TPTViews(32, views=6, augmix=augmix)
        a, b, c = views(image, seed=1), views(image, seed=1), views(image, seed=2)
        assert a.shape == (6, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a[1:], c[1:])
        torch.testing.assert_close(a[0], clip_transform(32, train=False)(image))
    assert not torch.equal(TPTViews(32, 6, True)(image, 1), TPTViews(32, 6, False)(image, 1))


def test_tpt_stage_on_a_small_folder_dataset(tmp_path):
    from PIL import Image

    from fastdpl.pipeline import stages
    from fastdpl.pipeline.demo import demo_config

    for c, name in enumerate(["circle", "square"]):
        for i in range(10):  # a seeded 50/20/30 split: 3 test images per class
            pixels = torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(10 * c + i))
            folder = tmp_path / "data" / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{i}.png")
    common = dict(dataset=f"folder:{tmp_path / 'data'}", template="a photo of a {}.", tpt_context="a photo of a",
                  shots=2, tpt_views=4,
                  tpt_keep=0.5, tpt_group=2, output=str(tmp_path / "run"), progress=False, train_epochs=1)
    result = stages.run_tpt(demo_config(**common))
    assert result["method"] == "tpt+zero_shot" and result["results"][common["dataset"]]["num_test"] == 6
    saved = json.loads((tmp_path / "run" / "tpt" / "results.json").read_text())
    assert saved["stage"] == "tpt"
    stages.run_train(demo_config(**common, prompt_config="uniform:2:2"))
    tuned = stages.run_tpt(demo_config(**common), prompts=str(tmp_path / "run" / "train" / "prompts.pt"))
    assert tuned["method"] == "tpt+uniform:2:2"
    # Each evaluation keeps its own file: the zero-shot TPT result is still there, unchanged.
    assert json.loads((tmp_path / "run" / "tpt" / "results-tpt_uniform_2_2.json").read_text()) == tuned
    assert json.loads((tmp_path / "run" / "tpt" / "results.json").read_text()) == saved


def test_tpt_views_use_augmix_for_fine_grained_sets_only(tmp_path, monkeypatch):
    import fastdpl.tpt
    from fastdpl.pipeline import stages
    from fastdpl.pipeline.demo import demo_config

    job = stages.prepare(demo_config(output=str(tmp_path / "run"), tpt_views=2, tpt_context="a photo of the",
                                     progress=False))
    dpl = stages.build_dpl(job, job.splits.classnames, "fixed", PromptConfig.zero_shot(4))
    seen = []
    real = fastdpl.tpt.TPTViews
    monkeypatch.setattr(fastdpl.tpt, "TPTViews", lambda size, views, augmix: seen.append(augmix) or
                        real(size, views, augmix))
    for dataset in ("imagenet_a", "imagenet-sketch", "dtd", "fgvc_aircraft"):
        stages.tpt_accuracy(job, dpl, job.splits.test[:1], dataset)
    assert seen == [False, False, True, True]
    job.cfg.tpt_augmix = "false"
    stages.tpt_accuracy(job, dpl, job.splits.test[:1], "dtd")
    assert seen[-1] is False
