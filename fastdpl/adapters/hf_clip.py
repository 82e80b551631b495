"""Hugging Face transformers' ``CLIPModel``: ViT image encoder, causal text encoder.

Blocks: ``CLIPEncoderLayer`` (layer_norm1, self_attn with separate q_proj / k_proj / v_proj /
out_proj, layer_norm2, mlp; no layer scale). Features: the image's class token through
post_layernorm and visual_projection; the text's end-of-text token (the first ``eos_token_id``,
or the largest id for configs with the legacy id 2) through final_layer_norm and
text_projection.

Exact savings: the text tower is causal (later tokens never reach the end-of-text token), so it
stops after the longest one; both features are read at one row, so the last block computes
only that row.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import FAMILIES, BlockOps, ModelAdapter, UnsupportedModelError, make_tower


class HFCLIPBlock(BlockOps):
    @staticmethod
    def matches(block) -> bool:
        attn = getattr(block, "self_attn", None)
        return attn is not None and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj")) and \
            all(hasattr(block, n) for n in ("layer_norm1", "layer_norm2", "mlp"))

    @staticmethod
    def check(where, block) -> None:
        attn = block.self_attn
        if abs(attn.scale - attn.head_dim ** -0.5) > 1e-12:
            raise UnsupportedModelError(f"{where}: attention scale {attn.scale} is not head_dim ** -0.5")

    @staticmethod
    def heads(block) -> int:
        return block.self_attn.num_heads

    @staticmethod
    def width(block) -> int:
        return block.self_attn.q_proj.in_features

    @staticmethod
    def norm1(block, x):
        return block.layer_norm1(x)

    @staticmethod
    def qkv(block, h):
        attn = block.self_attn
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)

    @staticmethod
    def kv(block, h):
        return block.self_attn.k_proj(h), block.self_attn.v_proj(h)

    @staticmethod
    def out_proj(block, out):
        return block.self_attn.out_proj(out)

    @staticmethod
    def residual_attention(block, x, out):
        return x + out

    @staticmethod
    def residual_mlp(block, x):
        return x + block.mlp(block.layer_norm2(x))


FAMILIES.append(HFCLIPBlock)


class HFEncoderAdapter(ModelAdapter):
    """What transformers' CLIP-like dual encoders share: ``vision_model`` and ``text_model`` with
    ``embeddings`` and ``encoder.layers``; ``get_image_features`` / ``get_text_features``."""

    def __init__(self, model: nn.Module, text_causal: bool):
        super().__init__(model)
        self.vision, self.text_model = model.vision_model, model.text_model
        self.image = make_tower("image", self.vision.encoder.layers, causal=False)
        self.text = make_tower("text", self.text_model.encoder.layers, causal=text_causal)

    # ---- image tower ----
    @property
    def image_size(self) -> tuple:
        size = self.vision.config.image_size
        return (size, size)

    @property
    def image_channels(self) -> int:
        return self.vision.embeddings.patch_embedding.in_channels

    @property
    def image_dtype(self) -> torch.dtype:
        return self.vision.embeddings.patch_embedding.weight.dtype

    # ---- text tower ----
    @property
    def token_embedding(self) -> nn.Module:
        return self.text_model.embeddings.token_embedding

    @property
    def context_length(self) -> int:
        return self.text_model.embeddings.position_embedding.num_embeddings

    @property
    def text_dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    def text_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        positions = self.text_model.embeddings.position_embedding.weight[: embeddings.shape[1]]
        return embeddings + positions.to(embeddings.dtype)

    # ---- the model's own forward ----
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=images).pooler_output

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids=tokens).pooler_output


class HFCLIPAdapter(HFEncoderAdapter):
    """transformers' CLIPModel as fastdpl runs it (references to its modules, never copies)."""

    family = "hf_clip"
    savings = frozenset({"truncate_text", "last_block_rows"})  # see the module docstring

    @staticmethod
    def matches(model) -> bool:
        return all(hasattr(model, n) for n in ("vision_model", "text_model", "visual_projection", "text_projection"))

    def __init__(self, model: nn.Module):
        if not hasattr(model.vision_model.embeddings, "class_embedding"):
            raise UnsupportedModelError(f"image tower {type(model.vision_model).__name__} is unsupported: fastdpl "
                                        "needs CLIP's ViT encoder (class-token pooling)")
        super().__init__(model, text_causal=True)

    @property
    def image_feature_width(self) -> int:
        return self.model.visual_projection.out_features

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding, class token, positions (the model's own embeddings module), pre_layrnorm."""
        return self.vision.pre_layrnorm(self.vision.embeddings(images.to(self.image_dtype)))

    def image_pooled_rows(self, batch: int, device) -> torch.Tensor:
        return torch.zeros(batch, dtype=torch.long, device=device)  # the class token

    def image_head(self, rows: torch.Tensor) -> torch.Tensor:
        return self.model.visual_projection(self.vision.post_layernorm(rows))

    def end_of_text(self, tokens: torch.Tensor) -> torch.Tensor:
        eos = self.text_model.eos_token_id
        if eos == 2:  # transformers' legacy configs: the largest id (CLIP's BPE end-of-text)
            return tokens.argmax(dim=-1)
        return (tokens == eos).int().argmax(dim=-1)

    def text_head(self, rows: torch.Tensor) -> torch.Tensor:
        return self.model.text_projection(self.text_model.final_layer_norm(rows))
