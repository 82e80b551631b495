"""Test-time prompt tuning (TPT), fast: tune the text prompt on each unlabeled test image alone.

For a test image: 64 views (the original plus 63 random resized crops, AugMix mixes
for the fine-grained and cross-dataset sets, exactly TPT's: fastdpl.data.augmix);
keep the 10 % of views whose class distribution has the lowest entropy; minimise the entropy of the *average* of the kept views'
distributions with one AdamW step (lr 5e-3) on the text prompt; predict the
original view with the tuned prompt; start the next image from the original
prompt and a fresh optimiser.

What is tuned: (a) ``tune="context"``: a CoOp-style learnable context that
replaces the embeddings of the template's leading words ("a photo of a"),
initialised from them — the TPT paper's setting; (b) ``tune="text_prompts"``: the
text-tower prompts of a fixed DPL configuration (FastDPLPrompt, mode="fixed"),
image prompts frozen.

Why it is fast (same results as the literal per-image loop, fastdpl.literal):
the views' image features do not depend on the text prompt, so they are computed
once per image without a graph, and the original view's feature is reused for
the prediction; the text tower uses FastDPLPrompt's exact savings (it stops at
the longest end-of-text position and its last block computes only the consumed
rows); and G test images can be tuned as one batch of G independent prompts:
AdamW is elementwise and the summed loss of independent images gives each copy
exactly its own gradient, so the batch equals G separate runs.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .data.augmix import SEVERITY, augmix
from .dtypes import at_least_float32
from .profiling import nvtx_range
from .methods.context import CoOpPrompt
from .prompt import FastDPLPrompt

TUNE = ("auto", "context", "text_prompts")


# ---- the objective ----------------------------------------------------------------------------------
def view_entropies(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per view: (..., V, C) -> (..., V); at least float32."""
    logp = torch.log_softmax(at_least_float32(logits), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def confident_views(logits: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Indices (..., K) of the K = max(1, floor(V * keep_fraction)) lowest-entropy views.

    Ties keep the earlier view (stable sort), so the choice is deterministic.
    """
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    views = logits.shape[-2]
    keep = max(1, int(views * keep_fraction))
    return torch.sort(view_entropies(logits), dim=-1, stable=True).indices[..., :keep]


def average_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean over views of softmax(logits): (..., K, C) -> (...).

    The mean is taken in probability space but computed in log space:
    log p̄ = logsumexp_k(log p_k) - log K, so confident views cannot underflow it.
    """
    logp = torch.log_softmax(at_least_float32(logits), dim=-1)
    mean_logp = torch.logsumexp(logp, dim=-2) - math.log(logits.shape[-2])
    return -(mean_logp.exp() * mean_logp).sum(-1)


# ---- the views --------------------------------------------------------------------------------------
class TPTViews:
    """A PIL image -> (views, 3, S, S): the test-preprocessed original first, then random views, as TPT.

    A random view is a random resized crop (scale 0.08-1, bilinear: torchvision's defaults, which TPT
    uses) with a random horizontal flip; with ``augmix`` it is AugMix-mixed at ``severity``
    (fastdpl.data.augmix: TPT's ops, ranges and mixing). Draws come from ``seed`` only.
    """

    def __init__(self, image_size: int, views: int = 64, augmix: bool = False, severity: float = SEVERITY):
        from torchvision import transforms as T

        from .data.images import CLIP_MEAN, CLIP_STD, clip_transform

        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        if not 0.1 < severity <= 10:
            raise ValueError(f"severity must be in (0.1, 10], got {severity}")
        self.views, self.augmix, self.severity = views, augmix, severity
        self.original = clip_transform(image_size, train=False)
        self.crop = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()])
        self.preprocess = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])

    def __call__(self, image, seed: int) -> torch.Tensor:
        from .data.images import open_image, seeded_transforms

        image = open_image(image)
        rng = np.random.default_rng(seed)
        with seeded_transforms(seed):  # torchvision draws from the global RNG
            out = [self.original(image)]
            for _ in range(self.views - 1):
                crop = self.crop(image)
                out.append(augmix(crop, self.preprocess, rng, self.severity) if self.augmix
                           else self.preprocess(crop))
        return torch.stack(out)


# ---- the tuner --------------------------------------------------------------------------------------
class TestTimePromptTuner:
    """TPT around a FastDPLPrompt (zero-shot: prompts of length 0, or a trained fixed DPL
    configuration) or around learned CoOp / CoCoOp contexts (fastdpl.methods).

    Args:
        method: FastDPLPrompt in fixed mode (its image prompts, if any, stay frozen), CoOpPrompt or
            CoCoOpPrompt.
        tune: "context" (a learnable context: for FastDPLPrompt it replaces the template's first
            words; for CoOp it starts from the learned context; for CoCoOp from the test image's
            context, ctx + meta_net(feature of the original view), as the TPT paper), "text_prompts"
            (a FastDPLPrompt's text-tower prompts), or "auto" (text_prompts when there are any).
        context: the words replaced by the learnable context of a FastDPLPrompt; the template must
            start with them.
        keep_fraction: share of the views with the lowest entropy that enter the loss (0.1).
        lr, weight_decay, steps: AdamW settings and steps per image (5e-3, 0.01 = AdamW's default, 1).
        meta_input: CoCoOp's meta-network input: "normalized" image features (as CoCoOp trains and
            predicts) or "raw" ones (the TPT code's ``gen_ctx``; docs/fidelity.md).

    ``predict(views)``: views (G, V, 3, S, S) of G test images, original view first -> logits (G, C)
    of the original views with each image's own tuned prompt. Nothing persists between calls.
    """

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, method, *, tune: str = "auto", context: str = "a photo of a",
                 keep_fraction: float = 0.1, lr: float = 5e-3, weight_decay: float = 0.01, steps: int = 1,
                 meta_input: str = "normalized"):
        if tune not in TUNE:
            raise ValueError(f"tune must be one of {TUNE}, got {tune!r}")
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if meta_input not in ("normalized", "raw"):
            raise ValueError(f"meta_input must be 'normalized' or 'raw', got {meta_input!r}")
        self.keep_fraction, self.lr, self.weight_decay, self.steps = keep_fraction, lr, weight_decay, steps
        self.meta_input = meta_input
        if isinstance(method, CoOpPrompt):
            if tune not in ("auto", "context"):
                raise ValueError(f"a {method.method} module tunes its context: tune must be 'auto' or 'context'")
            self.dpl, self.tune = method.eval(), "learned_context"
            self.initial = {} if method.image_conditioned else {"context": method.ctx.detach()}
            return
        if not isinstance(method, FastDPLPrompt) or method.mode != "fixed":
            raise ValueError("method must be a FastDPLPrompt in mode='fixed' (zero-shot: PromptConfig.zero_shot), "
                             "a CoOpPrompt or a CoCoOpPrompt")
        dpl = method
        text_lengths = dpl.config.lengths.get("text", ())
        if tune == "auto":
            tune = "text_prompts" if any(text_lengths) else "context"
        if tune == "text_prompts" and not any(text_lengths):
            raise ValueError("tune='text_prompts' but the module has no text prompts (use tune='context')")
        self.dpl, self.tune = dpl.eval(), tune
        if tune == "context":
            self.initial = {"context": self._initial_context(context)}
        else:
            self.initial = {b: dpl.prompt("text", b, n).detach() for b, n in enumerate(text_lengths) if n > 0}

    def _initial_context(self, words: str) -> torch.Tensor:
        dpl = self.dpl
        if len(dpl.templates) > 1:
            raise ValueError(f"tune='context' replaces the words of one template; this module's text input is an "
                             f"ensemble of {len(dpl.templates)} templates (use tune='text_prompts', or one "
                             "template)")
        n, start = dpl.leading_words(words), dpl.text_start
        return dpl.adapter.token_embedding(dpl.class_tokens[0, start:start + n]).detach()

    # ---- text features of G independent prompts ----
    def encode_text(self, tuned: dict) -> torch.Tensor:
        """(G, C, E) text features; ``tuned`` holds (G, ...) copies of the initial tensors: the
        module's public text encoding under G contexts or sets of text prompts."""
        if self.tune == "learned_context":
            return self.dpl.encode_text_with_context(tuned["context"])
        return self.dpl.encode_text_with_context(tuned.get("context"),
                                                 text_prompts={b: p for b, p in tuned.items() if b != "context"})

    def _logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(G, V, E) x (G, C, E) -> (G, V, C) CLIP logits."""
        return self.dpl.logits(image_features, text_features)

    def _check_views(self, views: torch.Tensor) -> None:
        if not isinstance(views, torch.Tensor) or views.dim() != 5:
            raise ValueError(f"views must be a (G, V, 3, S, S) tensor, got "
                             f"{tuple(views.shape) if isinstance(views, torch.Tensor) else type(views).__name__}")

    def predict(self, views: torch.Tensor) -> torch.Tensor:
        self._check_views(views)
        groups, num_views = views.shape[:2]
        with torch.no_grad(), nvtx_range("fastdpl/tpt/image"):
            image_features = self.dpl.encode_image(views.flatten(0, 1)).view(groups, num_views, -1)
        tuned = {k: v.unsqueeze(0).repeat(groups, *([1] * v.dim())).requires_grad_() for k, v in self.initial.items()}
        if self.dpl.image_conditioned:  # CoCoOp: each image's own context, from its original view
            with torch.no_grad():
                start = self.dpl.image_context(image_features[:, 0], normalize=self.meta_input == "normalized")
            tuned = {"context": start.detach().requires_grad_()}
        optimizer = torch.optim.AdamW(list(tuned.values()), lr=self.lr, weight_decay=self.weight_decay)
        selected = None
        for _ in range(self.steps):
            with nvtx_range("fastdpl/tpt/step"):
                logits = self._logits(image_features, self.encode_text(tuned))
                if selected is None:  # chosen once, with the initial prompt (as TPT)
                    selected = confident_views(logits.detach(), self.keep_fraction)
                kept = logits.gather(1, selected.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
                loss = average_entropy(kept).sum()  # independent images: each copy gets its own gradient
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            return self._logits(image_features[:, :1], self.encode_text(tuned))[:, 0]
