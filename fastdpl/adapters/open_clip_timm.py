"""open_clip models whose image tower is a timm VisionTransformer (open_clip's ``TimmModel``):
ViT-B-16-SigLIP and the other SigLIP/SigLIP2 configs (attention-pool head 'map', bidirectional
text read at the last position, a logit bias), vit_medium_patch16_gap_256 (average pooling),
MobileCLIP-B (class token, convolutional stem). The text tower is open_clip's own
(open_clip.py).

Blocks: timm's ``Block`` with timm's ``Attention`` (norm1, one packed qkv projection, q_norm /
k_norm, an optional LayerNorm before the output projection, proj; layer scales ls1 / ls2 and
drop paths on both residuals). qk_norm runs exactly; the inner norm (scale_attn_norm) is per
token, so exact with one candidate and refused by a search, which mixes candidates before it.
Gated attention and attention dropout are refused by name. Other trunks (ConvNeXt, EVA with
rotary embeddings, relative-position ViTs) and other block types are refused by name.

Exact savings: the image feature is read at one row only for class-token pooling
(global_pool='token'); an attention-pool ('map') or average head reads every row, so the last
image block computes them all. The text tower's savings are open_clip's.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import FAMILIES, BlockOps, UnsupportedModelError, make_tower, norm_after_mixture
from .open_clip import OpenClipAdapter


def _timm_classes():
    """timm's VisionTransformer, Block and Attention (Attention moved to timm.layers in late 1.0.x)."""
    from timm.models import vision_transformer

    attention = getattr(vision_transformer, "Attention", None)
    if attention is None:
        from timm.layers import Attention as attention
    return vision_transformer.VisionTransformer, vision_transformer.Block, attention


class TimmViTBlock(BlockOps):
    @staticmethod
    def matches(block) -> bool:
        attn = getattr(block, "attn", None)
        return all(hasattr(block, n) for n in ("norm1", "norm2", "mlp", "ls1", "ls2", "drop_path1")) and \
            all(hasattr(attn, n) for n in ("qkv", "proj", "q_norm", "k_norm", "num_heads"))

    @staticmethod
    def check(where, block) -> None:
        _, timm_block, timm_attention = _timm_classes()
        # the maths below is timm's Block.forward and Attention.forward: a subclass may change either
        if type(block).forward is not timm_block.forward:
            raise UnsupportedModelError(f"{where}: timm block {type(block).__name__} is unsupported (fastdpl runs "
                                        "timm's pre-norm Block)")
        attn = block.attn
        if type(attn).forward is not timm_attention.forward:
            raise UnsupportedModelError(f"{where}: timm attention {type(attn).__name__} is unsupported (fastdpl "
                                        "runs timm's Attention: no rotary or relative-position terms)")
        if getattr(attn, "gate", None) is not None:
            raise UnsupportedModelError(f"{where}: gated attention (timm Attention gated=True) is unsupported")
        if attn.attn_drop.p > 0:
            raise UnsupportedModelError(f"{where}: attention dropout ({attn.attn_drop.p}) is unsupported: build the "
                                        "model with attn_drop_rate=0")

    @staticmethod
    def mixable(where, block) -> None:
        if not isinstance(block.attn.norm, nn.Identity):
            raise norm_after_mixture(where, "timm Attention with scale_norm (scale_attn_norm)")

    @staticmethod
    def heads(block) -> int:
        return block.attn.num_heads

    @staticmethod
    def width(block) -> int:
        return block.attn.qkv.in_features

    @staticmethod
    def norm1(block, x):
        return block.norm1(x)

    @staticmethod
    def qkv(block, h):
        return block.attn.qkv(h).chunk(3, dim=-1)  # timm reshapes (..., 3, H, D): the same three chunks

    @staticmethod
    def kv(block, h):
        qkv = block.attn.qkv
        inner = qkv.out_features // 3
        bias = qkv.bias[inner:] if qkv.bias is not None else None
        return F.linear(h, qkv.weight[inner:], bias).chunk(2, dim=-1)

    @staticmethod
    def queries_and_keys(block, q, k):
        return block.attn.q_norm(q), block.attn.k_norm(k)

    @staticmethod
    def keys(block, k):
        return block.attn.k_norm(k)

    @staticmethod
    def merge(block, out):
        return block.attn.norm(out.transpose(1, 2).flatten(2))

    @staticmethod
    def out_proj(block, out):
        return block.attn.proj_drop(block.attn.proj(out))

    @staticmethod
    def residual_attention(block, x, out):
        return x + block.drop_path1(block.ls1(out))

    @staticmethod
    def residual_mlp(block, x):
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


FAMILIES.append(TimmViTBlock)


class OpenClipTimmAdapter(OpenClipAdapter):
    """An open_clip model with a timm image tower as fastdpl runs it (references, never copies)."""

    family = "open_clip_timm"

    @staticmethod
    def matches(model) -> bool:
        return OpenClipAdapter.matches(model) and hasattr(model.visual, "trunk")

    def _image_tower(self):
        trunk = self.visual.trunk
        vision_transformer, _, _ = _timm_classes()
        if not isinstance(trunk, vision_transformer) or \
                type(trunk).forward_features is not vision_transformer.forward_features:
            raise UnsupportedModelError(f"timm image tower {type(trunk).__name__} is unsupported: fastdpl runs "
                                        "timm's VisionTransformer (ConvNeXt, EVA, relative-position and other "
                                        "trunks are not supported)")
        if "pool" in self.visual.head:
            raise UnsupportedModelError("timm image tower: open_clip's attention pooling on a 2-d feature map "
                                        "(abs_attn / rot_attn) is unsupported")
        self.trunk = trunk
        # one row is read only with class-token pooling; 'map', 'avg' and the like read every row
        self._pooled_row = trunk.global_pool == "token" and trunk.attn_pool is None and trunk.cls_token is not None
        return make_tower("image", trunk.blocks, causal=False)

    @property
    def image_size(self) -> tuple:
        return tuple(self.visual.image_size)

    @property
    def image_channels(self) -> int:
        """The input channels of the patch embedding's first convolution (a plain patchify or a stem)."""
        return next(m for m in self.trunk.patch_embed.modules() if isinstance(m, nn.Conv2d)).in_channels

    @property
    def image_dtype(self) -> torch.dtype:
        return next(self.trunk.patch_embed.parameters()).dtype

    @property
    def image_feature_width(self) -> int:
        head = self.visual.head
        if "proj" in head:
            return head.proj.out_features
        if "mlp" in head:
            return head.mlp.fc2.out_features
        return self.trunk.head.out_features if isinstance(self.trunk.head, nn.Linear) else self.trunk.num_features

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's own patch embedding, prefix tokens and positions, patch dropout, norm_pre."""
        trunk = self.trunk
        x = trunk._pos_embed(trunk.patch_embed(images.to(self.image_dtype)))
        return trunk.norm_pre(trunk.patch_drop(x))

    def image_pooled_rows(self, batch: int, device):
        return torch.zeros(batch, dtype=torch.long, device=device) if self._pooled_row else None

    def image_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """The trunk's norm, its own pooling head (pool, fc_norm, head) and open_clip's projection head;
        with class-token pooling ``tokens`` is the class rows (B, W): a one-token sequence to the pool."""
        tokens = tokens.unsqueeze(1) if self._pooled_row else tokens
        return self.visual.head(self.trunk.forward_head(self.trunk.norm(tokens)))
