"""A stand-in for open_clip 4's attention (its main branch, 4.2.0.dev0: ``transformer.Attention``
and the ``ResidualAttentionBlock`` that calls it), written here from its structure: the same weight
names as nn.MultiheadAttention (in_proj_weight, in_proj_bias, out_proj) and its options qk_norm,
scaled_cosine, head_scale and inner_norm. pip serves open_clip 3.3.0, whose blocks use
nn.MultiheadAttention; ``convert`` swaps this class into such a model with the same weights."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm=False, scaled_cosine=False, scale_heads=False, inner_norm=False,
                 separate_kv_dims=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.logit_scale_max = math.log(1.0 / 0.01)
        if separate_kv_dims:
            self.in_proj_weight = None
            self.q_proj_weight = nn.Parameter(torch.empty(dim, dim))
        else:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.ln_q = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.ln_k = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(num_heads, 1, 1))) if scaled_cosine else None
        self.head_scale = nn.Parameter(torch.ones(num_heads, 1, 1)) if scale_heads else None
        self.ln_inner = nn.LayerNorm(dim) if inner_norm else nn.Identity()
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, k_x=None, v_x=None, attn_mask=None):
        batch, length, width = x.shape
        k_x = x if k_x is None else k_x
        v_x = x if v_x is None else v_x
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        split = lambda t: t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # noqa: E731
        q, k, v = split(F.linear(x, w_q, b_q)), split(F.linear(k_x, w_k, b_k)), split(F.linear(v_x, w_v, b_v))
        if self.logit_scale is not None:
            logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
            logits = logits * torch.clamp(self.logit_scale, max=self.logit_scale_max).exp()
        else:
            logits = (self.ln_q(q) * self.scale) @ self.ln_k(k).transpose(-1, -2)
        if attn_mask is not None:
            logits = logits + attn_mask.to(logits.dtype)
        out = logits.softmax(-1) @ v
        if self.head_scale is not None:
            out = out * self.head_scale
        return self.out_proj(self.ln_inner(out.transpose(1, 2).reshape(batch, -1, width)))


class NextBlock(ResidualAttentionBlock):
    """open_clip 4's block: it calls its attention with k_x, v_x and attn_mask keywords."""

    def attention(self, q_x, k_x=None, v_x=None, attn_mask=None):
        attn_mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        return self.attn(q_x, k_x=k_x, v_x=v_x, attn_mask=attn_mask)


def convert(model, seed=0, **options):
    """Every block of both towers gets an Attention with the MHA's weights; options get random values."""
    gen = torch.Generator().manual_seed(seed)
    for tower in (model.visual.transformer, model.transformer):
        for block in tower.resblocks:
            mha = block.attn
            attn = Attention(mha.embed_dim, mha.num_heads, **options)
            with torch.no_grad():
                if attn.in_proj_weight is not None:
                    attn.in_proj_weight.copy_(mha.in_proj_weight)
                attn.in_proj_bias.copy_(mha.in_proj_bias)
                attn.out_proj.load_state_dict(mha.out_proj.state_dict())
                for name, p in attn.named_parameters():  # the options' own parameters: random, not defaults
                    if name.split(".")[0] in ("ln_q", "ln_k", "ln_inner", "head_scale", "logit_scale"):
                        p.add_(0.3 * torch.randn(p.shape, generator=gen))
            block.attn = attn.requires_grad_(mha.in_proj_weight.requires_grad)
            block.__class__ = NextBlock
    return model
