"""What the train stage adds to the cross-entropy of any CLIP method (DPL's configuration, uniform
deep prompts, CoOp, CoCoOp): distillation towards zero-shot CLIP (``--distill-weight``) and
PromptSRC's self-regularisation (Khattak et al., ICCV 2023; ``--regularizer promptsrc``).

PromptSRC's three parts, as its trainer computes them (muzairkhattak/PromptSRC,
trainers/promptsrc.py), none of which cares how the prompts are arranged:

* feature agreement: ``w_text * L1(t, t0)`` and ``w_image * L1(f, f0)`` (mean over elements),
  between the prompted model's normalised text features t and the frozen model's t0, and its
  normalised image features f and the frozen f0. t0 is PromptSRC's "textual diversity": per
  class, the frozen text features of its 60 ImageNet templates averaged, then normalised.
* logit agreement: ``w_logit * KL(p0 || p)`` summed and divided by the number of logits (B x C),
  p = softmax of the prompted logits, p0 = softmax of logit_scale * f0 t0^T (the frozen model's
  zero-shot logits under the same scale). PromptSRC's weight is 1; fastdpl's distillation term
  (--distill-weight) is separate and unchanged.
* Gaussian prompt aggregation (GPA): after epoch e of N, every trained tensor is added to a
  running sum with weight g_e = N(e; mean, std) / sum_k N(k; mean, std), k = 1..N; the run's
  result is that sum. The sum is in the checkpoint, so a resumed run aggregates exactly.

Zero cost when off: with every weight 0 no term is built and the frozen model never runs; the
frozen image forward runs once per step (no gradient) when a term needs it, shared by all terms.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..dtypes import at_least_float32
from ..templates import IMAGENET_TEMPLATES, tokenize_classes
from .training import Regularizer

# PromptSRC's published aggregation (configs/trainers/PromptSRC/*.yaml): (mean, std) by protocol.
GPA_BASE_TO_NEW = (15.0, 1.0)  # 20 epochs
GPA_CROSS_DATASET = (6.0, 10.0)  # 20 epochs, evaluated on other datasets
GPA_FEW_SHOT = (30.0, 30.0)  # 50 epochs: ImageNet, Caltech101, OxfordPets, Food101, UCF101, SUN397
GPA_FEW_SHOT_FINE = (45.0, 5.0)  # 50 epochs: StanfordCars, Flowers102, FGVCAircraft, DTD, EuroSAT
FEW_SHOT_FINE = ("stanford_cars", "oxford_flowers", "fgvc_aircraft", "dtd", "eurosat")


def promptsrc_defaults(values: dict) -> dict:
    """--regularizer promptsrc: PromptSRC's weights (text 25, image 10, logits 1), its base-to-new
    epochs (20) and its aggregation for every setting not given; ``values``: the settings given so
    far (the aggregation follows their epochs and dataset). The learning rate and batch stay the
    method's (PromptSRC's, 0.0025 and 4, are close to DPL's 0.0035 and 4; they are shared with
    the search stage, which PromptSRC does not touch)."""
    from ..data import canonical_name

    out = dict(src_text_weight=25.0, src_image_weight=10.0, src_logit_weight=1.0)
    epochs = values.setdefault("train_epochs", 20)
    out.update(train_epochs=epochs)
    if epochs == 20:
        gpa = GPA_CROSS_DATASET if values.get("eval_datasets") else GPA_BASE_TO_NEW
    elif epochs == 50:
        try:
            fine = canonical_name(str(values.get("dataset", ""))) in FEW_SHOT_FINE
        except ValueError:  # an unknown dataset is reported by the stage itself
            fine = False
        gpa = GPA_FEW_SHOT_FINE if fine else GPA_FEW_SHOT
    elif "gpa_mean" in values or "gpa_std" in values:
        return out  # given (or switched off with none): nothing to fill
    else:
        raise ValueError(f"--regularizer promptsrc: PromptSRC publishes its aggregation for 20 and 50 epochs; for "
                         f"--train-epochs {epochs} give --gpa-mean and --gpa-std (none: no aggregation)")
    out.update(gpa_mean=gpa[0], gpa_std=gpa[1])
    return out


def gaussian_weights(epochs: int, mean: float, std: float) -> list[float]:
    """g_e for e = 1..epochs: the normal density at e, normalised to sum to 1 (PromptSRC's GPA)."""
    density = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
    total = sum(density)
    if total == 0:
        raise ValueError(f"--gpa-mean {mean} / --gpa-std {std} put no weight on epochs 1..{epochs}")
    return [d / total for d in density]


class GaussianAggregation:
    """The running Gaussian-weighted sum of a module's trained tensors over epochs (float64)."""

    def __init__(self, params: list, weights: list[float]):
        self.params, self.weights = list(params), list(weights)
        self.sums = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]

    @torch.no_grad()
    def add(self, epoch: int) -> None:
        """Add the tensors as they are after ``epoch`` (1-based) with that epoch's weight."""
        weight = self.weights[epoch - 1]
        for total, p in zip(self.sums, self.params):
            total.add_(p.detach().double(), alpha=weight)

    @torch.no_grad()
    def apply(self) -> None:
        """The aggregate becomes the module's tensors (the run's result)."""
        for total, p in zip(self.sums, self.params):
            p.copy_(total.to(p.dtype))

    def state_dict(self) -> dict:
        return {"weights": self.weights, "sums": [s.clone() for s in self.sums]}

    def load_state_dict(self, state: dict) -> None:
        if state["weights"] != self.weights or len(state["sums"]) != len(self.sums):
            raise ValueError("the checkpoint's prompt aggregation was made with other epochs or tensors")
        for total, saved in zip(self.sums, state["sums"]):
            total.copy_(saved)


def trained_tensors(module) -> list:
    """Every tensor a train stage trains (its parameter groups but alpha)."""
    return [p for name, group in module.parameter_groups().items() if name != "arch" for p in group]


def frozen_image_features(job):
    """images -> the frozen model's normalised image features (no gradient: Step.frozen runs it)."""
    from ..adapters import adapt

    model = adapt(job.model)
    return lambda images: F.normalize(at_least_float32(model.encode_image(images)), dim=-1)


@torch.no_grad()
def template_text_features(job, classnames, templates, average: str) -> torch.Tensor:
    """(C, E) frozen text features over ``templates``: "normalised" averages the normalised features
    and normalises (CLIP's ensembling, the distillation teacher); "raw" averages the raw features,
    then normalises (PromptSRC's fixed embeddings)."""
    from ..adapters import adapt

    model = adapt(job.model)
    features = []
    for template in templates:
        tokens = tokenize_classes(classnames, template, job.tokenizer, model.context_length).to(job.device)
        text = at_least_float32(model.encode_text(tokens))
        features.append(F.normalize(text, dim=-1) if average == "normalised" else text)
    return F.normalize(torch.stack(features).mean(0), dim=-1)


def logit_scale(job) -> torch.Tensor:
    from ..adapters import adapt

    return adapt(job.model).logit_scale.exp()


def _distillation(job, classnames) -> list:
    """KL(teacher || student) at temperature T, weighted; the teacher is zero-shot CLIP."""
    cfg = job.cfg
    if cfg.distill_weight == 0:
        return []
    templates = IMAGENET_TEMPLATES if cfg.distill_teacher == "ensemble" else IMAGENET_TEMPLATES[-1:]
    teacher, scale, T = template_text_features(job, classnames, templates, "normalised"), logit_scale(job), \
        cfg.distill_temperature

    def term(step):
        target = F.log_softmax(scale * step.frozen() @ teacher.T / T, dim=-1)
        student = F.log_softmax(at_least_float32(step.predictions) / T, dim=-1)
        return cfg.distill_weight * T * T * F.kl_div(student, target, log_target=True, reduction="batchmean")
    return [Regularizer("distillation", term, frozen=True)]


def _promptsrc(job, classnames) -> list:
    """PromptSRC's feature and logit agreement terms (those with a non-zero weight)."""
    cfg = job.cfg
    weights = {"text": cfg.src_text_weight, "image": cfg.src_image_weight, "logit": cfg.src_logit_weight}
    if not any(weights.values()):
        return []
    fixed = template_text_features(job, classnames, IMAGENET_TEMPLATES, "raw")
    scale = logit_scale(job)
    terms = []
    if weights["text"]:
        def text(step):
            prompted = F.normalize(at_least_float32(step.features["text"]), dim=-1)
            return weights["text"] * F.l1_loss(prompted, fixed.expand_as(prompted))
        terms.append(Regularizer("promptsrc_text", text, features=True))
    if weights["image"]:
        def image(step):
            prompted = F.normalize(at_least_float32(step.features["image"]), dim=-1)
            return weights["image"] * F.l1_loss(prompted, step.frozen())
        terms.append(Regularizer("promptsrc_image", image, features=True, frozen=True))
    if weights["logit"]:
        def logits(step):
            student = at_least_float32(step.predictions)
            zero_shot = scale * step.frozen() @ fixed.T
            return weights["logit"] * F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(zero_shot, dim=-1),
                                               log_target=True, reduction="sum") / student.numel()
        terms.append(Regularizer("promptsrc_logits", logits, frozen=True))
    return terms


def train_regularization(job, classnames) -> dict:
    """Training arguments of the train stage's terms: the regularizers and, when one reads the
    frozen model, its image features (one frozen forward per step for all of them)."""
    terms = tuple(_distillation(job, classnames) + _promptsrc(job, classnames))
    frozen = frozen_image_features(job) if any(t.frozen for t in terms) else None
    return {"regularizers": terms, "frozen": frozen} if terms else {}


def aggregation(job, module):
    """The train stage's Gaussian prompt aggregation, or None (no --gpa-mean)."""
    cfg = job.cfg
    if cfg.gpa_mean is None:
        return None
    return GaussianAggregation(trained_tensors(module), gaussian_weights(cfg.train_epochs, cfg.gpa_mean, cfg.gpa_std))
