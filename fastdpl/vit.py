"""Differentiable Prompt Learning for timm ViT image classifiers: searched VPT-deep prompt lengths.

VPT-deep (Jia et al. 2022) inserts learned tokens after a frozen ViT's embeddings and replaces
them at every layer. Every operation of a pre-norm block except the attention is per token, and
the prompt rows are never pooled, so the real tokens see layer l's prompts only through layer
l's keys and values: VPT-deep is exactly DPL's rule (DESIGN.md section 6), the prompts are the
core's token prompts (``PromptShape.tokens``), each normalised by the block's own norm1 and
projected by its own key/value weights (and k_norm), with no position embedding. The search
mixes each block's candidate lengths by softmax(alpha) as for CLIP (DESIGN.md section 2).

Exact for timm's ``VisionTransformer`` with timm's ``Block`` and ``Attention`` (the image-tower
adapter of fastdpl/adapters/open_clip_timm.py runs them), every pooling head (class token,
average of the patch tokens, attention pool 'map'), q/k norms and layer scales. Refused by name:
other trunks (EVA and BEiT with rotary or relative positions, ConvNeXt), other blocks, attention
dropout, and in a search the norm inside the attention (scale_attn_norm, not linear in the
mixture). The classifier head is trained with the prompts, as VPT trains it (``head_parameters``,
its own parameter group "head"); ``reset_head`` re-initialises it for the train stage.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from .adapters.base import UnsupportedModelError, check_mixable, make_tower, project_prompts, prompted_block
from .config import PromptConfig
from .core import MODES, BankHolder, PromptBank, PromptShape, Stack
from .ops import IMPLS
from .profiling import nvtx_range

STACK = "image"
INITS = ("normal", "vpt")
VIT_LENGTHS = (0, 1, 5, 10)  # VPT's default length 5 and NOAH's per-layer choices {1, 5, 10}, and none


def _vision_transformer():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def check_classifier(model: nn.Module) -> None:
    """UnsupportedModelError naming what fastdpl cannot run exactly as VPT-deep."""
    try:
        vision_transformer = _vision_transformer()
    except ImportError:
        raise UnsupportedModelError("FastDPLViT needs timm (pip install timm)") from None
    if not isinstance(model, vision_transformer):
        raise UnsupportedModelError(f"{type(model).__name__} is not a timm VisionTransformer: FastDPLViT prompts "
                                    "timm's ViT classifiers (EVA, BEiT, ConvNeXt and other trunks are unsupported)")
    for method in ("forward_features", "forward_head", "_pos_embed", "pool"):
        if getattr(type(model), method, None) is not getattr(vision_transformer, method, None):
            raise UnsupportedModelError(f"{type(model).__name__} overrides VisionTransformer.{method}: fastdpl "
                                        "runs timm's own VisionTransformer")


class FastDPLViT(BankHolder, nn.Module):
    """Searched (or fixed) VPT-deep prompt lengths per block of a timm ViT classifier.

    Args:
        model: a timm ``VisionTransformer`` classifier; its backbone is frozen, its classifier head
            (``model.get_classifier()``) trained with the prompts.
        mode: "search" (a supernet over ``candidate_lengths``) or "fixed" (lengths from ``config``).
        candidate_lengths: distinct non-negative prompt lengths searched per block.
        config: a PromptConfig over the stack "image" (fixed mode), e.g. ``dpl.derive_config()``.
        impl: op engine: "auto" (Triton on CUDA, eager otherwise), "eager", "triton" or "reference".
        generator: draws the initial prompts and alpha; a private one seeded 0 when None, so the
            global RNG is never touched and the same arguments give the same prompts.
        init: the prompts' start: "normal" N(0, 0.02^2) (fastdpl's) or "vpt" (VPT's: uniform on
            +-sqrt(6 / (3 p^2 + W)), a Xavier bound over a p x p patch's pixels and the width W).
        prompt_dropout: VPT's dropout on the prompt tokens while training, an independent mask for
            every image (fixed mode only: a supernet's candidates are shared by the batch).
    """

    def __init__(self, model: nn.Module, *, mode: str = "search", candidate_lengths: Sequence[int] = VIT_LENGTHS,
                 config: PromptConfig | None = None, impl: str = "auto", generator: torch.Generator | None = None,
                 init: str = "normal", prompt_dropout: float = 0.0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not 0.0 <= prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {prompt_dropout!r}")
        if prompt_dropout and mode == "search":
            raise ValueError("prompt_dropout is VPT's per-image dropout of fixed prompts; a search shares its "
                             "candidates across the batch: use it in fixed mode (the train stage)")
        self.set_impl(impl)  # validates it
        check_classifier(model)
        tower = make_tower(STACK, model.blocks, causal=False)
        if mode == "search":
            check_mixable(tower)
        names = {module: name for name, module in model.named_modules()}
        stack = Stack(STACK, tower.blocks, PromptShape.tokens(tower.width), [names[b] for b in tower.blocks],
                      noun="tower")
        self.bank = PromptBank([stack], mode=mode, candidate_lengths=candidate_lengths, config=config,
                               generator=generator)
        if init == "vpt":
            self._vpt_init(model, generator)
        self.init, self.prompt_dropout = init, float(prompt_dropout)
        self.model = model
        model.requires_grad_(False)
        for p in self.head_parameters():
            p.requires_grad_(True)
        # the head reads one row only with class-token pooling; 'avg' and 'map' read every patch row
        self._pooled_row = model.global_pool == "token" and model.attn_pool is None and model.cls_token is not None
        self.bank.to(next(model.parameters()).device)

    def _vpt_init(self, model: nn.Module, generator: torch.Generator | None) -> None:
        """VPT's prompt start: U(-b, b), b = sqrt(6 / (3 p_h p_w + W)), drawn after the bank's own draws."""
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        patch = model.patch_embed.patch_size
        patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
        with torch.no_grad():
            for p in self.prompt_parameters():
                bound = math.sqrt(6.0 / (3 * patch[0] * patch[1] + p.shape[-1]))
                p.copy_(torch.rand(p.shape, generator=generator).mul_(2 * bound).sub_(bound))

    # ---- what a training loop needs ------------------------------------------------------------------
    def head_parameters(self) -> list[nn.Parameter]:
        """The classifier head's parameters (trained with the prompts, as VPT does)."""
        return list(self.model.get_classifier().parameters())

    def parameter_groups(self) -> dict:
        return {**super().parameter_groups(), "head": self.head_parameters()}

    def reset_head(self, generator: torch.Generator | None = None) -> None:
        """A fresh head for the train stage: weights N(0, 0.02^2) truncated at 2 std, bias 0 (timm's
        own head initialisation), drawn from ``generator`` (the global RNG is left alone)."""
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        head = self.model.get_classifier()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"reset_head: the classifier head is {type(head).__name__}, not a Linear layer")
        with torch.no_grad():
            weight = torch.randn(head.weight.shape, generator=generator).clamp_(-2, 2).mul_(0.02)
            head.weight.copy_(weight)
            if head.bias is not None:
                head.bias.zero_()

    def derive_config(self) -> PromptConfig:
        """The argmax of alpha per block (search), or the fixed configuration."""
        return self.bank.derive_config(allowed=(STACK,))

    def prompt(self, tower: str, block: int, length: int) -> nn.Parameter:
        """Block ``block``'s (length, width) prompt tokens; ``tower`` is "image" (FastDPLPrompt's shape)."""
        return self.bank.prompt(tower, block, length)

    def set_impl(self, impl: str) -> None:
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl

    # ---- state ---------------------------------------------------------------------------------------
    def prompt_state_dict(self) -> dict:
        """The prompts, alpha and the settings that rebuild them (the core's bank state), and the
        trained head's tensors."""
        return {"bank": self.bank.state(), "head": {k: v.detach().clone() for k, v in
                                                    self.model.get_classifier().state_dict().items()},
                "prompt_dropout": self.prompt_dropout}

    def load_prompt_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not {"bank", "head"} <= set(state) <= {"bank", "head", "prompt_dropout"}:
            raise ValueError("not a FastDPLViT state (expected the keys 'bank' and 'head')")
        self.bank.load_state(state["bank"])
        self.model.get_classifier().load_state_dict(state["head"])

    @classmethod
    def from_state(cls, model: nn.Module, state: dict, *, impl: str = "auto") -> "FastDPLViT":
        """The FastDPLViT whose ``prompt_state_dict`` is ``state``, around ``model`` (the same architecture)."""
        settings = state.get("bank", {}).get("settings", {}) if isinstance(state, dict) else {}
        config = PromptConfig.from_dict(settings["config"]) if settings.get("config") else None
        dpl = cls(model, mode=settings.get("mode", "search"), candidate_lengths=settings.get("candidate_lengths") or (0,),
                  config=config, impl=impl, prompt_dropout=state.get("prompt_dropout", 0.0))
        dpl.load_prompt_state_dict(state)
        return dpl

    # ---- forward -------------------------------------------------------------------------------------
    def _check_images(self, images) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        channels = next(c for c in self.model.patch_embed.modules() if isinstance(c, nn.Conv2d)).in_channels
        if images.dim() != 4 or images.shape[1] != channels or images.shape[0] == 0:
            raise ValueError(f"images must have shape (B, {channels}, H, W) with B > 0, got {tuple(images.shape)}")

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The last block's tokens, before the final norm: (B, N, W), or the class rows (B, 1, W)
        when the head reads only them."""
        if not torch.compiler.is_compiling():
            self._check_images(images)
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        last = len(m.blocks) - 1
        keep = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if self._pooled_row else None
        for b, block in enumerate(m.blocks):
            name = f"fastdpl/image/block{b}"
            with nvtx_range(name):
                found = self.bank.block_prompts(STACK, b, x.dtype)
                kv, lengths, weights = (None, None, None) if found is None else \
                    (project_prompts(block, self._dropped(found[0], x.shape[0])), found[1], found[2])
                x = prompted_block(block, x, kv, lengths, weights, False, self.impl,
                                   keep_rows=keep if b == last else None, name=name)
        return x

    def _dropped(self, prompts: torch.Tensor, batch: int) -> torch.Tensor:
        """The block's prompts, with VPT's dropout in training: (B, P, W), a mask per image."""
        if not (self.training and self.prompt_dropout):
            return prompts
        return nn.functional.dropout(prompts.expand(batch, -1, -1), self.prompt_dropout, training=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes): timm's own final norm and head on the prompted tokens."""
        return self.model.forward_head(self.model.norm(self.forward_features(images)))

    def extra_repr(self) -> str:
        dropout = f", prompt_dropout={self.prompt_dropout}" if self.prompt_dropout else ""
        return f"model={type(self.model).__name__}, {self.bank.extra_repr()}, impl={self.impl!r}{dropout}"


__all__ = ["FastDPLViT", "VIT_LENGTHS", "check_classifier"]
