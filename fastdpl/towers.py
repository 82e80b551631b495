"""open_clip towers as fastdpl runs them: checks, embeddings, and the prompted block.

A prompted block (DESIGN.md section 1) is the open_clip pre-norm block with the
attention replaced by the mixture op:

    h = ln_1(x);  q, k, v = in_proj(h)
    pk, pv = in_proj_kv(ln_1(P))                    (once per block per step, shared by the batch)
    x = x + ls_1(out_proj(mixture_prefix_attention(q, k, v, pk, pv, lengths, weights)))
    x = x + ls_2(mlp(ln_2(x)))

using the block's own weights (never copied). The open_clip ``ResidualAttentionBlock``
with ``nn.MultiheadAttention`` (open_clip 3.x) or with open_clip's own ``Attention``
(4.x: the same weight names; its qk_norm, scaled_cosine, head_scale and inner_norm
options are applied exactly: see _queries_and_keys and _merge_heads).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import mixture_prefix_attention
from .profiling import nvtx_range


class UnsupportedModelError(ValueError):
    """The open_clip model has a tower or block that fastdpl cannot prompt."""


# ---- the block's attention: nn.MultiheadAttention (open_clip 3.x) or open_clip's own Attention (4.x) ----
def is_open_clip_attention(attn: nn.Module) -> bool:
    """open_clip 4's ``Attention`` (same weight names as nn.MultiheadAttention: in_proj_weight,
    in_proj_bias, out_proj; plus optional qk_norm, scaled_cosine, head_scale, inner_norm)."""
    return (not isinstance(attn, nn.MultiheadAttention) and hasattr(attn, "in_proj_weight")
            and hasattr(attn, "out_proj") and hasattr(attn, "num_heads") and hasattr(attn, "ln_inner"))


def attention_width(attn: nn.Module) -> int:
    return attn.embed_dim if isinstance(attn, nn.MultiheadAttention) else attn.in_proj_weight.shape[1]


def _check_block(tower: str, index: int, block: nn.Module) -> None:
    where = f"{tower} tower block {index}"
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention) and not is_open_clip_attention(attn):
        raise UnsupportedModelError(
            f"{where}: {type(block).__name__} with attention {type(attn).__name__} is unsupported; fastdpl needs "
            "open_clip's ResidualAttentionBlock with nn.MultiheadAttention or open_clip's Attention")
    if not all(hasattr(block, name) for name in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")):
        raise UnsupportedModelError(f"{where}: {type(block).__name__} is not an open_clip ResidualAttentionBlock")
    if hasattr(block, "ln_1_kv"):
        raise UnsupportedModelError(f"{where}: cross-attention blocks are unsupported")
    if hasattr(block, "ln_attn"):
        raise UnsupportedModelError(f"{where}: {type(block).__name__} (open_clip's block_type='custom'): custom "
                                    "attention blocks are not supported")
    if isinstance(attn, nn.MultiheadAttention):
        if not attn.batch_first or not attn._qkv_same_embed_dim or attn.bias_k is not None:
            raise UnsupportedModelError(
                f"{where}: nn.MultiheadAttention must be batch_first, with one packed in-projection and no bias_kv")
        if attn.head_dim * attn.num_heads != attn.embed_dim:
            raise UnsupportedModelError(f"{where}: embed_dim {attn.embed_dim} is not divisible by "
                                        f"{attn.num_heads} heads")
    elif attn.in_proj_weight is None:
        raise UnsupportedModelError(f"{where}: Attention with separate q/k/v projections (kdim or vdim != dim) is "
                                    "unsupported")


def check_mixable(tower: str, blocks) -> None:
    """DPL's search mixes the candidates' attention outputs; the fused op mixes them before the output
    projection, which is exact only when what follows the attention is linear. open_clip Attention's
    inner norm (a LayerNorm before out_proj) is not: refused in search mode (fixed mode runs it exactly)."""
    for index, block in enumerate(blocks):
        attn = block.attn
        if not isinstance(attn, nn.MultiheadAttention) and not isinstance(attn.ln_inner, nn.Identity):
            raise UnsupportedModelError(
                f"{tower} tower block {index}: Attention with inner_norm (scale_attn_inner) cannot be searched: "
                "the mixture of candidates would pass through its LayerNorm; use mode='fixed'")


def _queries_and_keys(attn: nn.Module, q: torch.Tensor, k: torch.Tensor):
    """open_clip Attention's options on (..., H, N, D) queries and keys, in the form the op takes
    (softmax(q k^T / sqrt(D))): qk_norm applies its LayerNorms; scaled_cosine (softmax(exp(s_h)
    cos(q, k))) normalises both and folds exp(s_h) * sqrt(D) into the queries."""
    if isinstance(attn, nn.MultiheadAttention):
        return q, k
    if attn.logit_scale is not None:
        scale = torch.clamp(attn.logit_scale, max=attn.logit_scale_max).exp() * q.shape[-1] ** 0.5  # (H, 1, 1)
        return F.normalize(q, dim=-1) * scale.to(q.dtype), F.normalize(k, dim=-1)
    return attn.ln_q(q), attn.ln_k(k)


def _keys(attn: nn.Module, k: torch.Tensor) -> torch.Tensor:
    """The keys' half of _queries_and_keys (prompt keys, projected on their own)."""
    if isinstance(attn, nn.MultiheadAttention):
        return k
    return F.normalize(k, dim=-1) if attn.logit_scale is not None else attn.ln_k(k)


def _merge_heads(attn: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) attention output -> (B, N, W), with open_clip Attention's head_scale and inner
    norm (both per token: they commute with picking rows)."""
    if not isinstance(attn, nn.MultiheadAttention) and attn.head_scale is not None:
        out = out * attn.head_scale.to(out.dtype)
    out = out.transpose(1, 2).flatten(2)
    return out if isinstance(attn, nn.MultiheadAttention) else attn.ln_inner(out)


@dataclass
class TowerParts:
    """References (never copies) to the modules of one tower."""

    name: str
    blocks: list
    width: int
    heads: int
    causal: bool


def image_parts(model: nn.Module) -> TowerParts:
    visual = getattr(model, "visual", None)
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "ln_post", "proj", "transformer")
    if visual is None or not all(hasattr(visual, n) for n in needed):
        kind = type(visual).__name__ if visual is not None else "none"
        raise UnsupportedModelError(
            f"image tower {kind} is unsupported: fastdpl needs open_clip's VisionTransformer "
            "(ResNet and timm towers are not supported)")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise UnsupportedModelError("image tower: only class-token pooling (pool_type='tok') is supported")
    blocks = list(visual.transformer.resblocks)
    for i, block in enumerate(blocks):
        _check_block("image", i, block)
    return TowerParts("image", blocks, attention_width(blocks[0].attn), blocks[0].attn.num_heads, causal=False)


def text_module(model: nn.Module) -> nn.Module:
    """The module holding the text tower: the CLIP model itself, or CustomTextCLIP's ``.text``."""
    return model.text if hasattr(model, "text") and hasattr(model.text, "transformer") else model


def text_parts(model: nn.Module) -> TowerParts:
    text = text_module(model)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if not all(hasattr(text, n) for n in needed):
        raise UnsupportedModelError(
            f"text tower of {type(model).__name__} is unsupported: fastdpl needs open_clip's text transformer "
            "(token_embedding, positional_embedding, transformer, ln_final, text_projection)")
    if getattr(text, "cls_emb", None) is not None:
        raise UnsupportedModelError("text tower: a CoCa-style class embedding is unsupported")
    if text_pool_type(model) not in ("argmax", "eos"):
        raise UnsupportedModelError(f"text tower: pool type {text_pool_type(model)!r} is unsupported; "
                                    "fastdpl reads the end-of-text token ('argmax' or 'eos')")
    if getattr(text, "attn_mask", None) is None:
        raise UnsupportedModelError("text tower: only the causal text transformer is supported")
    blocks = list(text.transformer.resblocks)
    for i, block in enumerate(blocks):
        _check_block("text", i, block)
    return TowerParts("text", blocks, attention_width(blocks[0].attn), blocks[0].attn.num_heads, causal=True)


def text_pool_type(model) -> str:
    text = text_module(model)
    return getattr(text, "text_pool_type", None) or getattr(text, "pool_type", "argmax")


def end_of_text_positions(model, tokens: torch.Tensor) -> torch.Tensor:
    """Index of the token whose final feature is the text feature, per sequence."""
    if text_pool_type(model) == "eos":
        eos = getattr(text_module(model), "text_eos_id", None) or getattr(text_module(model), "eos_id", None)
        return (tokens == eos).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)  # CLIP's BPE: end-of-text has the largest id


# ---- embeddings and heads (open_clip's own steps, with its own modules) ------------------------------

def image_embeddings(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding, class token, positional embedding, patch dropout, ln_pre: (B, 1 + grid^2, width)."""
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x) if hasattr(visual, "patch_dropout") else x
    return visual.ln_pre(x)


def image_head(visual: nn.Module, class_token: torch.Tensor) -> torch.Tensor:
    """ln_post on the class token, then the projection (LayerNorm is per token: same as pooling after)."""
    pooled = visual.ln_post(class_token)
    return pooled @ visual.proj if visual.proj is not None else pooled


def text_embeddings(model: nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
    """Token embeddings (B, L, W) plus the first L positional embeddings."""
    return embeddings + text_module(model).positional_embedding[: embeddings.shape[1]].to(embeddings.dtype)


def place_context(embeddings: torch.Tensor, context: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
    """CoOp-style learnable context in the token embeddings (S, L, W): ``context`` (n, W) for every
    sequence or (S, n, W) one per sequence, at positions 1..n (``slots`` None: the template's
    leading words) or at ``slots`` (S, n) (a class token in front of or amid the context)."""
    sequences, _, width = embeddings.shape
    context = context.to(embeddings.dtype).expand(sequences, context.shape[-2], width)
    if slots is None:
        return torch.cat([embeddings[:, :1], context, embeddings[:, 1 + context.shape[1]:]], dim=1)
    index = slots.unsqueeze(-1).expand(-1, -1, width)
    return embeddings.scatter(1, index, context)


def text_head(model: nn.Module, eot_features: torch.Tensor) -> torch.Tensor:
    text = text_module(model)
    x = text.ln_final(eot_features)
    projection = text.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


# ---- the prompted block ---------------------------------------------------------------------------

def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, W) -> (B, H, N, W / H) as a view."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def project_prompts(block: nn.Module, prompts: torch.Tensor):
    """ln_1, then the block's key and value projections: (P, W) -> two (H, P, head_dim) tensors;
    a batch of independent prompts (B, P, W) -> two (B, H, P, head_dim) tensors."""
    attn = block.attn
    width = attention_width(attn)
    bias = attn.in_proj_bias[width:] if attn.in_proj_bias is not None else None
    kv = F.linear(block.ln_1(prompts), attn.in_proj_weight[width:], bias)  # (..., P, 2W)
    kv = kv.unflatten(-1, (2, attn.num_heads, -1)).movedim(-3, 0)  # (2, ..., P, H, hd)
    pk, pv = kv.transpose(-3, -2).unbind(0)
    return _keys(attn, pk), pv


def attention_with_own_prompts(q, k, v, pk, pv, causal: bool) -> torch.Tensor:
    """Attention of q over [k ; pk] when every sequence has its own prompts pk, pv (B, H, P, D),
    e.g. independent prompts per test image in TPT. Causal on the original keys; prompts visible."""
    keys, values = torch.cat([k, pk], dim=2), torch.cat([v, pv], dim=2)
    mask = None
    if causal:
        n, p = q.shape[2], pk.shape[2]
        mask = torch.ones(n, n + p, dtype=torch.bool, device=q.device)
        mask[:, :n] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def prompted_block(block: nn.Module, x: torch.Tensor, prompt_kv, candidate_lengths, weights, causal: bool,
                   impl: str, keep_rows: torch.Tensor | None = None, name: str = "") -> torch.Tensor:
    """One block; ``prompt_kv`` = (pk, pv) shared by the batch (H, P, D), or per sequence
    (B, H, P, D; one candidate), or None for no prompts. ``keep_rows`` (B,) selects
    the one row per sequence that is consumed after the attention (last block only)."""
    attn = block.attn
    heads = attn.num_heads
    with nvtx_range(f"{name}/attn"):
        q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = _heads(q, heads), _heads(k, heads), _heads(v, heads)
        q, k = _queries_and_keys(attn, q, k)
        if prompt_kv is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        elif prompt_kv[0].dim() == 4:  # one prompt set per sequence
            out = attention_with_own_prompts(q, k, v, prompt_kv[0], prompt_kv[1], causal)
        else:
            out = mixture_prefix_attention(q, k, v, prompt_kv[0], prompt_kv[1], candidate_lengths, weights,
                                           causal=causal, impl=impl)
        out = _merge_heads(attn, out)  # (B, N, W)
    if keep_rows is not None:
        rows = torch.arange(x.shape[0], device=x.device)
        x, out = x[rows, keep_rows].unsqueeze(1), out[rows, keep_rows].unsqueeze(1)
    with nvtx_range(f"{name}/mlp"):
        x = x + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x
