"""Hugging Face transformers' ``SiglipModel``: ViT image encoder with an attention-pooling head,
non-causal text encoder read at its last position, and a logit bias.

Blocks: ``SiglipEncoderLayer`` (the CLIPEncoderLayer structure: hf_clip.HFCLIPBlock runs it).

Exact savings: the image feature pools every row (an attention-pooling head), so the image
tower's last block computes all rows; the text tower is not causal, so it runs every position
(no truncation); its feature is read at the last position only, so the text tower's last block
computes that row alone.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import UnsupportedModelError
from .hf_clip import HFEncoderAdapter


class HFSiglipAdapter(HFEncoderAdapter):
    """transformers' SiglipModel as fastdpl runs it (references to its modules, never copies)."""

    family = "hf_siglip"
    savings = frozenset({"last_block_rows"})  # text only: see the module docstring

    @staticmethod
    def matches(model) -> bool:
        return all(hasattr(model, n) for n in ("vision_model", "text_model", "logit_bias")) and \
            hasattr(model.text_model, "head") and not hasattr(model, "visual_projection")

    def __init__(self, model: nn.Module):
        if not isinstance(getattr(model.vision_model.embeddings, "patch_embedding", None), nn.Conv2d):
            raise UnsupportedModelError(
                f"image tower of {type(model).__name__}: NaFlex patch embeddings (SigLIP2's variable-resolution "
                "patch sequences) are unsupported; fastdpl runs SiglipModel, or open_clip's ViT-B-16-SigLIP2")
        if getattr(model.vision_model, "head", None) is None:
            raise UnsupportedModelError("image tower: a SigLIP vision model without its pooling head is unsupported")
        super().__init__(model, text_causal=False)

    @property
    def image_feature_width(self) -> int:
        return self.vision.config.hidden_size

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision.embeddings(images.to(self.image_dtype))

    def image_pooled_rows(self, batch: int, device):
        return None  # the attention-pooling head reads every row

    def image_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """post_layernorm on every token (B, N, W), then the attention-pooling head."""
        return self.vision.head(self.vision.post_layernorm(tokens))

    def end_of_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """SigLIP reads the last position (padding included, as it was trained)."""
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)

    def text_head(self, rows: torch.Tensor) -> torch.Tensor:
        return self.text_model.head(self.text_model.final_layer_norm(rows))
