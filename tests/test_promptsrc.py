"""PromptSRC's self-regularisation on fastdpl's methods (pipeline/regularizers.py): the regularised
loss and its gradients against a literal PromptSRC written here on open_clip's own modules; the
Gaussian prompt aggregation against the closed-form weighted sum of the per-epoch tensors; zero
weights are bitwise the plain run with no frozen forward; resume mid-aggregation is bitwise; the
preset's published values."""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from fastdpl.literal import _literal_context_prompts, _literal_text_features, literal_encode_image, literal_encode_text
from fastdpl.pipeline import regularizers, stages, training
from fastdpl.pipeline.classifier import wrap
from fastdpl.pipeline.config import method_config
from fastdpl.pipeline.demo import demo_config
from fastdpl.templates import IMAGENET_TEMPLATES
from helpers import normalised_error, stop_after_checkpoint


def quick(tmp_path, name="run", **overrides):
    settings = dict(shots=2, train_epochs=3, batch_size=4, output=str(tmp_path / name), resume=False, progress=False,
                    eval_batch_size=256, method="uniform:2:2")
    return demo_config(**{**settings, **overrides})


def _literal_promptsrc(model, classnames, images, labels, logits, text, image, weights):
    """PromptSRC's trainer, written out: CE + w_t L1(t, t0) + w_i L1(f, f0) + w_l KL(p0 || p) / (B C),
    t0 the normalised mean of the frozen text features over the 60 templates, f0 the frozen image
    features, all through open_clip's own encode_text / encode_image."""
    with torch.no_grad():
        context = model.positional_embedding.shape[0]
        fixed = torch.stack([model.encode_text(open_clip.tokenize([t.format(c) for c in classnames],
                                                                  context_length=context))
                             for t in IMAGENET_TEMPLATES]).mean(0)
        fixed = F.normalize(fixed, dim=-1)
        frozen = F.normalize(model.encode_image(images), dim=-1)
        zero_shot = model.logit_scale.exp() * frozen @ fixed.T
    text, image = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
    loss = F.cross_entropy(logits, labels)
    loss = loss + weights[0] * (text - fixed.expand_as(text)).abs().mean() + weights[1] * (image - frozen).abs().mean()
    log_p, log_p0 = F.log_softmax(logits, -1), F.log_softmax(zero_shot, -1)
    return loss + weights[2] * (log_p0.exp() * (log_p0 - log_p)).sum() / logits.numel()


def _images(seed=1):
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["dpl", "coop", "cocoop"])
def test_the_regularised_loss_is_literal_promptsrc_with_gradients(tmp_path, method):
    context = {"method": method, "n_ctx": 3, "ctx_init": None} if method != "dpl" else {}
    cfg = quick(tmp_path, regularizer="promptsrc", train_epochs=20, src_text_weight=2.5, src_image_weight=1.5,
                src_logit_weight=3.0, **context)
    job = stages.prepare(cfg, "train")
    module, _ = stages.ClipFamily.trained(job)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in module.parameter_groups()["prompt"]:
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    terms = stages.ClipFamily.regularizers(job)
    assert [r.name for r in terms["regularizers"]] == ["promptsrc_text", "promptsrc_image", "promptsrc_logits"]
    images, labels = _images(), torch.tensor([0, 3, 5, 9])
    ours, _ = training.step_loss(wrap(module, job), images, labels, regularizers=terms["regularizers"],
                                 frozen=terms["frozen"])
    model, names = job.model, job.splits.classnames
    if method == "dpl":
        text, image = literal_encode_text(module), literal_encode_image(module, images)
    else:
        image = model.encode_image(images)
    if method == "coop":
        text = _literal_text_features(model, *_literal_context_prompts(module, module.ctx))
    if method == "cocoop":  # every image its own class texts, (B, C, E)
        shifts = module.meta_net(F.normalize(image, dim=-1))
        text = torch.stack([_literal_text_features(model, *_literal_context_prompts(module, module.ctx + shift))
                            for shift in shifts])
        logits = model.logit_scale.exp() * torch.einsum("be,bce->bc", F.normalize(image, dim=-1),
                                                        F.normalize(text, dim=-1))
    else:
        logits = model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    theirs = _literal_promptsrc(model, names, images, labels, logits, text, image, (2.5, 1.5, 3.0))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    params = module.parameter_groups()["prompt"]
    for g, h in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)):
        assert h.abs().max() > 0 and normalised_error(g, h) < 1e-5


def _per_epoch_tensors(monkeypatch):
    """The trained tensors as each epoch's checkpoint saw them (before aggregation)."""
    seen = []
    save = training._save_checkpoint

    def record(job, out, epoch, train, history):
        seen.append([p.detach().clone() for p in regularizers.trained_tensors(train.module)])
        save(job, out, epoch, train, history)

    monkeypatch.setattr(training, "_save_checkpoint", record)
    return seen


def test_the_aggregate_is_the_closed_form_gaussian_sum_of_the_epochs(tmp_path, monkeypatch):
    seen = _per_epoch_tensors(monkeypatch)
    stages.run_train(quick(tmp_path, gpa_mean=2.0, gpa_std=0.8))
    density = [math.exp(-0.5 * ((e - 2.0) / 0.8) ** 2) / (0.8 * math.sqrt(2 * math.pi)) for e in (1, 2, 3)]
    weights = [d / sum(density) for d in density]
    assert len(seen) == 3 and weights[1] > weights[0] > 0
    saved = torch.load(tmp_path / "run" / "train" / "prompts.pt", weights_only=False)["prompts"]
    expected = [sum(w * epoch[i].double() for w, epoch in zip(weights, seen)) for i in range(len(seen[0]))]
    assert len(saved) == len(expected) == 4  # 2 tokens in 2 blocks of both towers
    for got, want in zip(saved.values(), expected):
        torch.testing.assert_close(got.double(), want, rtol=2e-7, atol=1e-9)
        assert not torch.equal(got, seen[-1][0])  # the result is the aggregate, not the last epoch


def test_zero_weights_and_no_aggregation_are_the_plain_run_bitwise(tmp_path, monkeypatch):
    plain = stages.run_train(quick(tmp_path, "plain"))
    monkeypatch.setattr(regularizers, "frozen_image_features", lambda *a: pytest.fail("the frozen model ran"))
    monkeypatch.setattr(regularizers, "template_text_features", lambda *a: pytest.fail("frozen text features"))
    off = quick(tmp_path, "off", regularizer="promptsrc", src_text_weight=0, src_image_weight=0, src_logit_weight=0,
                gpa_mean=None, gpa_std=None)
    assert (off.src_text_weight, off.gpa_mean) == (0, None)
    assert stages.run_train(off)["top1"] == plain["top1"]
    a, b = (torch.load(tmp_path / run / "train" / "prompts.pt", weights_only=False)["prompts"] for run in ("plain", "off"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_mid_aggregation_is_bitwise(tmp_path, monkeypatch):
    settings = dict(regularizer="promptsrc", gpa_mean=2.0, gpa_std=1.0)
    stages.run_train(quick(tmp_path, "whole", **settings))
    restore = stop_after_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        stages.run_train(quick(tmp_path, "cut", **settings))
    restore()
    stages.run_train(quick(tmp_path, "cut", resume=True, **settings))
    a, b = (torch.load(tmp_path / run / "train" / "prompts.pt", weights_only=False)["prompts"] for run in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [(tmp_path / run / "train" / "metrics.jsonl").read_text() for run in ("whole", "cut")]
    assert metrics[0] == metrics[1]


def test_cocoop_aggregates_its_meta_network_too(tmp_path):
    job = stages.prepare(quick(tmp_path, method="cocoop", ctx_init=None, n_ctx=2), "train")
    module, _ = stages.ClipFamily.trained(job)
    tensors = regularizers.trained_tensors(module)
    assert tensors[0] is module.ctx and len(tensors) == 1 + len(list(module.meta_net.parameters()))


def test_the_preset_fills_promptsrcs_published_values():
    cfg = method_config(regularizer="promptsrc")
    assert (cfg.src_text_weight, cfg.src_image_weight, cfg.src_logit_weight, cfg.train_epochs, cfg.gpa_mean,
            cfg.gpa_std) == (25.0, 10.0, 1.0, 20, 15.0, 1.0)
    assert (cfg.lr, cfg.batch_size) == (method_config().lr, method_config().batch_size)  # the method's own
    assert method_config(regularizer="promptsrc", eval_datasets=["dtd"]).gpa_mean == 6.0
    assert (method_config(regularizer="promptsrc", train_epochs=50, dataset="dtd").gpa_mean,
            method_config(regularizer="promptsrc", train_epochs=50, dataset="imagenet").gpa_std) == (45.0, 30.0)
    assert method_config(regularizer="promptsrc", src_text_weight=3).src_text_weight == 3  # given wins
    with pytest.raises(ValueError, match="for --train-epochs 40 give --gpa-mean and --gpa-std"):
        method_config(regularizer="promptsrc", train_epochs=40)
    assert method_config(regularizer="promptsrc", train_epochs=40, gpa_mean=30, gpa_std=5).gpa_mean == 30
    with pytest.raises(ValueError, match="give --gpa-std too"):
        method_config(gpa_mean=3.0)
    with pytest.raises(ValueError, match="--regularizer: PromptSRC"):
        method_config(model="timm:tiny", regularizer="promptsrc")
