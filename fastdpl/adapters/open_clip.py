"""open_clip's CLIP (and CustomTextCLIP): ViT image tower, text transformer (causal, or not).

Blocks: ``ResidualAttentionBlock`` with ``nn.MultiheadAttention`` (open_clip 3.x) or with
open_clip's own ``Attention`` (its main branch, the next release: the same weight names
in_proj_weight, in_proj_bias, out_proj). The Attention's options run exactly: qk_norm (its
LayerNorms on queries and keys), scaled_cosine (softmax(exp(s_h) cos(q, k)): both normalised,
exp(s_h) sqrt(D) folded into the queries), head_scale (per head, before the output projection)
and inner_norm (a LayerNorm before the output projection: per token, so exact with one
candidate; a search, which mixes candidates before it, refuses it).

The text tower is causal (CLIP) or bidirectional (``no_causal_mask``: SigLIP, MobileCLIP-S), and
its feature is read at one row: the end-of-text token ('argmax', 'eos'), the last or the first
position. Padding masks (``use_pad_mask``) are refused.

Exact savings: a causal text tower stops after the longest end-of-text token (later tokens never
reach it); a bidirectional one runs every position. Features read at one row (the class token,
the text's pooled token) let the last block compute only that row. Timm image towers:
open_clip_timm.py.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import FAMILIES, BlockOps, ModelAdapter, UnsupportedModelError, make_tower, norm_after_mixture


def _is_attention(attn) -> bool:
    """open_clip's own ``Attention`` (3.x's custom blocks, 4.x's every block)."""
    return (attn is not None and not isinstance(attn, nn.MultiheadAttention) and hasattr(attn, "in_proj_weight")
            and hasattr(attn, "out_proj") and hasattr(attn, "num_heads") and hasattr(attn, "ln_inner"))


class OpenClipBlock(BlockOps):
    @staticmethod
    def matches(block) -> bool:
        attn = getattr(block, "attn", None)
        return (isinstance(attn, nn.MultiheadAttention) or _is_attention(attn)) and all(
            hasattr(block, name) for name in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2"))

    @staticmethod
    def check(where, block) -> None:
        attn = block.attn
        if hasattr(block, "ln_1_kv"):
            raise UnsupportedModelError(f"{where}: cross-attention blocks are unsupported")
        if hasattr(block, "ln_attn"):
            raise UnsupportedModelError(f"{where}: {type(block).__name__} (open_clip's block_type='custom'): custom "
                                        "attention blocks are not supported")
        if isinstance(attn, nn.MultiheadAttention):
            if not attn.batch_first or not attn._qkv_same_embed_dim or attn.bias_k is not None:
                raise UnsupportedModelError(f"{where}: nn.MultiheadAttention must be batch_first, with one packed "
                                            "in-projection and no bias_kv")
            if attn.head_dim * attn.num_heads != attn.embed_dim:
                raise UnsupportedModelError(f"{where}: embed_dim {attn.embed_dim} is not divisible by "
                                            f"{attn.num_heads} heads")
        elif attn.in_proj_weight is None:
            raise UnsupportedModelError(f"{where}: Attention with separate q/k/v projections (kdim or vdim != dim) "
                                        "is unsupported")

    @staticmethod
    def mixable(where, block) -> None:
        attn = block.attn
        if not isinstance(attn, nn.MultiheadAttention) and not isinstance(attn.ln_inner, nn.Identity):
            raise norm_after_mixture(where, "Attention with inner_norm (scale_attn_inner)")

    @staticmethod
    def heads(block) -> int:
        return block.attn.num_heads

    @staticmethod
    def width(block) -> int:
        attn = block.attn
        return attn.embed_dim if isinstance(attn, nn.MultiheadAttention) else attn.in_proj_weight.shape[1]

    @staticmethod
    def norm1(block, x):
        return block.ln_1(x)

    @staticmethod
    def qkv(block, h):
        return F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)

    @staticmethod
    def kv(block, h):
        attn = block.attn
        width = OpenClipBlock.width(block)
        bias = attn.in_proj_bias[width:] if attn.in_proj_bias is not None else None
        return F.linear(h, attn.in_proj_weight[width:], bias).chunk(2, dim=-1)

    @staticmethod
    def queries_and_keys(block, q, k):
        attn = block.attn
        if isinstance(attn, nn.MultiheadAttention):
            return q, k
        if attn.logit_scale is not None:  # softmax(exp(s) cos(q, k)) = softmax((exp(s) sqrt(D) q/|q|) (k/|k|) / sqrt(D))
            scale = torch.clamp(attn.logit_scale, max=attn.logit_scale_max).exp() * q.shape[-1] ** 0.5
            return F.normalize(q, dim=-1) * scale.to(q.dtype), F.normalize(k, dim=-1)
        return attn.ln_q(q), attn.ln_k(k)

    @staticmethod
    def keys(block, k):
        attn = block.attn
        if isinstance(attn, nn.MultiheadAttention):
            return k
        return F.normalize(k, dim=-1) if attn.logit_scale is not None else attn.ln_k(k)

    @staticmethod
    def merge(block, out):
        attn = block.attn
        if not isinstance(attn, nn.MultiheadAttention) and attn.head_scale is not None:
            out = out * attn.head_scale.to(out.dtype)
        out = out.transpose(1, 2).flatten(2)
        return out if isinstance(attn, nn.MultiheadAttention) else attn.ln_inner(out)

    @staticmethod
    def out_proj(block, out):
        return F.linear(out, block.attn.out_proj.weight, block.attn.out_proj.bias)

    @staticmethod
    def residual_attention(block, x, out):
        return x + block.ls_1(out)

    @staticmethod
    def residual_mlp(block, x):
        return x + block.ls_2(block.mlp(block.ln_2(x)))


FAMILIES.append(OpenClipBlock)


def _text_module(model: nn.Module) -> nn.Module:
    """The module holding the text tower: the CLIP model itself, or CustomTextCLIP's ``.text``."""
    return model.text if hasattr(model, "text") and hasattr(model.text, "transformer") else model


class OpenClipAdapter(ModelAdapter):
    """open_clip's CLIP as fastdpl runs it (references to its modules, never copies)."""

    family = "open_clip"
    TEXT_POOLS = ("argmax", "eos", "last", "first")

    @staticmethod
    def matches(model) -> bool:
        return hasattr(model, "visual") and hasattr(model, "logit_scale") and hasattr(_text_module(model),
                                                                                      "token_embedding")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.visual, self.text_module = getattr(model, "visual", None), _text_module(model)
        self.image = self._image_tower()
        self.text = make_tower("text", self._check_text_tower().transformer.resblocks, causal=self._text_causal())
        # one row is read from the text (always) and the image (when image_pooled_rows is not None)
        self.savings = frozenset({"last_block_rows"} | ({"truncate_text"} if self.text.causal else set()))

    def _image_tower(self):
        visual = self.visual
        needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "ln_post", "proj", "transformer")
        if visual is None or not all(hasattr(visual, n) for n in needed):
            kind = type(visual).__name__ if visual is not None else "none"
            raise UnsupportedModelError(f"image tower {kind} is unsupported: fastdpl needs open_clip's "
                                        "VisionTransformer or a timm VisionTransformer (ResNet towers are not "
                                        "supported)")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise UnsupportedModelError("image tower: only class-token pooling (pool_type='tok') is supported")
        return make_tower("image", visual.transformer.resblocks, causal=False)

    def _check_text_tower(self) -> nn.Module:
        text = self.text_module
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        if not all(hasattr(text, n) for n in needed):
            raise UnsupportedModelError(
                f"text tower of {type(self.model).__name__} is unsupported: fastdpl needs open_clip's text "
                "transformer (token_embedding, positional_embedding, transformer, ln_final, text_projection)")
        if getattr(text, "cls_emb", None) is not None:
            raise UnsupportedModelError("text tower: a CoCa-style class embedding is unsupported")
        if getattr(text, "use_pad_mask", False):
            raise UnsupportedModelError("text tower: use_pad_mask (a padding mask on a bidirectional text "
                                        "tower) is unsupported")
        if self._pool_type() not in self.TEXT_POOLS:
            raise UnsupportedModelError(f"text tower: pool type {self._pool_type()!r} is unsupported; fastdpl "
                                        f"reads one token ({', '.join(map(repr, self.TEXT_POOLS))})")
        return text

    def _text_causal(self) -> bool:
        """open_clip keeps a causal mask buffer on the text tower (or on CLIP itself); None: bidirectional."""
        return getattr(self.text_module, "attn_mask", None) is not None

    # ---- image tower ----
    @property
    def image_size(self) -> tuple:
        size = getattr(self.visual, "image_size", ())
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    @property
    def image_channels(self) -> int:
        return self.visual.conv1.in_channels

    @property
    def image_dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def image_feature_width(self) -> int:
        return self.visual.output_dim

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding, class token, positions, patch dropout, ln_pre: (B, 1 + grid^2, width)."""
        visual = self.visual
        x = visual.conv1(images.to(self.image_dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x) if hasattr(visual, "patch_dropout") else x
        return visual.ln_pre(x)

    def image_pooled_rows(self, batch: int, device) -> torch.Tensor:
        """The row each image's feature is read from (the class token)."""
        return torch.zeros(batch, dtype=torch.long, device=device)

    def image_head(self, rows: torch.Tensor) -> torch.Tensor:
        """ln_post on the pooled rows (B, W), then the projection."""
        pooled = self.visual.ln_post(rows)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    # ---- text tower ----
    @property
    def token_embedding(self) -> nn.Module:
        return self.text_module.token_embedding

    @property
    def context_length(self) -> int:
        return self.text_module.positional_embedding.shape[0]

    @property
    def text_dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    def _pool_type(self) -> str:
        text = self.text_module
        return getattr(text, "text_pool_type", None) or getattr(text, "pool_type", "argmax")

    def end_of_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the token whose final feature is the text feature, per sequence."""
        pool = self._pool_type()
        if pool in ("last", "first"):
            index = tokens.shape[1] - 1 if pool == "last" else 0
            return torch.full((tokens.shape[0],), index, dtype=torch.long, device=tokens.device)
        if pool == "eos":
            text = self.text_module
            eos = getattr(text, "text_eos_id", None) or getattr(text, "eos_id", None)
            return (tokens == eos).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)  # CLIP's BPE: end-of-text has the largest id

    def text_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, W) plus the first L positional embeddings."""
        return embeddings + self.text_module.positional_embedding[: embeddings.shape[1]].to(embeddings.dtype)

    def text_head(self, rows: torch.Tensor) -> torch.Tensor:
        """ln_final on the pooled rows (B, W), then the projection."""
        x = self.text_module.ln_final(rows)
        projection = self.text_module.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection

    # ---- the model's own forward (zero-shot references, the distillation teacher) ----
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

