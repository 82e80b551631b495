"""What every tower family provides, and the prompted block that runs on any of them.

A family (a library's CLIP) is one adapter file: it says how to run one pre-norm block
(``BlockOps``: the pre-norm, the q/k/v projections of the tokens and of the prompts, the
query/key options, the head merge, the output projection, layer scales and MLP) and one
model (``ModelAdapter``: embeddings, the blocks of each tower, the heads, whether the text
tower is causal, where features are read, which exact savings apply). Nothing else in
fastdpl knows a library's module names.

A prompted block (DESIGN.md section 1) is the family's block with the attention replaced
by the mixture op:

    h = norm1(x);  q, k, v = qkv(h)
    pk, pv = kv(norm1(P))                         (once per block per step, shared by the batch)
    x = residual_attention(x, out_proj(merge(mixture_prefix_attention(q, k, v, pk, pv, lengths, w))))
    x = residual_mlp(x)

using the block's own weights (never copied).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import mixture_prefix_attention
from ..profiling import nvtx_range


class UnsupportedModelError(ValueError):
    """The model has a tower or block that fastdpl cannot prompt; the message names it."""


class BlockOps:
    """How fastdpl runs one block of a family. Every method takes the block (never copied)."""

    @staticmethod
    def matches(block: nn.Module) -> bool:
        raise NotImplementedError

    @staticmethod
    def check(where: str, block: nn.Module) -> None:
        """Raise UnsupportedModelError naming what fastdpl cannot run exactly."""

    @staticmethod
    def mixable(where: str, block: nn.Module) -> None:
        """Raise UnsupportedModelError when a mixture of candidate attentions is not exact (search)."""

    @staticmethod
    def heads(block: nn.Module) -> int:
        raise NotImplementedError

    @staticmethod
    def width(block: nn.Module) -> int:
        raise NotImplementedError

    @staticmethod
    def norm1(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def qkv(block: nn.Module, h: torch.Tensor):
        """(..., N, W) normalised tokens -> q, k, v (..., N, W)."""
        raise NotImplementedError

    @staticmethod
    def kv(block: nn.Module, h: torch.Tensor):
        """(..., P, W) normalised prompts -> k, v (..., P, W): the key and value projections only."""
        raise NotImplementedError

    @staticmethod
    def queries_and_keys(block: nn.Module, q: torch.Tensor, k: torch.Tensor):
        """(..., H, N, D) queries and keys in the form softmax(q k^T / sqrt(D)) takes (q/k norms...)."""
        return q, k

    @staticmethod
    def keys(block: nn.Module, k: torch.Tensor) -> torch.Tensor:
        return k

    @staticmethod
    def merge(block: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """(B, H, N, D) -> (B, N, W); anything per head or per token before the output projection."""
        return out.transpose(1, 2).flatten(2)

    @staticmethod
    def out_proj(block: nn.Module, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def residual_attention(block: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def residual_mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def norm_after_mixture(where: str, option: str) -> UnsupportedModelError:
    """The error of a search over a block whose attention normalises its output per token: the
    mixture sum_c w_c attn_c would pass through that norm, which is not the weighted mixture of the
    candidates' blocks (exact with one candidate: fixed mode)."""
    return UnsupportedModelError(f"{where}: {option} cannot be searched: the mixture of candidates would pass "
                                 "through its LayerNorm; use mode='fixed'")


FAMILIES: list = []  # BlockOps subclasses, tried in order by block_ops


def block_ops(block: nn.Module) -> type[BlockOps]:
    for ops in FAMILIES:
        if ops.matches(block):
            return ops
    attn = getattr(block, "attn", None)
    raise UnsupportedModelError(f"{type(block).__name__} with attention {type(attn).__name__} is unsupported; "
                                "fastdpl runs open_clip's ResidualAttentionBlock (nn.MultiheadAttention or "
                                "open_clip's Attention), timm's ViT Block and transformers' CLIP/SigLIP layers")


class ModelAdapter:
    """A model as fastdpl runs it (a family's subclass: references to its modules, never copies).

    Provides: ``image`` and ``text`` (Towers); image_size, image_channels, image_dtype,
    image_feature_width, image_embeddings(images), image_pooled_rows(batch, device) (None: the head
    pools every row), image_head(rows or tokens); token_embedding, context_length, text_dtype,
    end_of_text(tokens), text_embeddings(embeddings), text_head(rows); encode_image / encode_text
    (the model's own forward); logit_scale, logit_bias; ``savings``: the exact savings that apply
    ("truncate_text": a causal text tower stops after the longest end-of-text token;
    "last_block_rows": the last block computes only the row a feature is read from, in the text
    tower and, where image_pooled_rows is not None, in the image tower)."""

    savings = frozenset()

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def logit_bias(self):
        return getattr(self.model, "logit_bias", None)


@dataclass
class Tower:
    """References (never copies) to the blocks of one tower, and how to run them."""

    name: str
    blocks: list
    width: int
    heads: int
    causal: bool
    ops: type = BlockOps


def make_tower(name: str, blocks, causal: bool) -> Tower:
    blocks = list(blocks)
    if not blocks:
        raise UnsupportedModelError(f"{name} tower has no blocks")
    ops = None
    for index, block in enumerate(blocks):
        where = f"{name} tower block {index}"
        try:
            found = block_ops(block)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"{where}: {exc}") from None
        if ops is not None and found is not ops:
            raise UnsupportedModelError(f"{where}: a {found.__name__} block among {ops.__name__} blocks")
        ops = found
        ops.check(where, block)
    return Tower(name, blocks, ops.width(blocks[0]), ops.heads(blocks[0]), causal, ops)


def check_mixable(tower: Tower) -> None:
    for index, block in enumerate(tower.blocks):
        tower.ops.mixable(f"{tower.name} tower block {index}", block)


# ---- the prompted block -------------------------------------------------------------------------------
def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., N, W) -> (..., H, N, W / H) as a view."""
    return t.unflatten(-1, (heads, -1)).transpose(-3, -2)


def project_prompts(block: nn.Module, prompts: torch.Tensor):
    """The block's pre-norm, then its key and value projections: (P, W) -> two (H, P, head_dim)
    tensors; a batch of independent prompts (B, P, W) -> two (B, H, P, head_dim) tensors."""
    ops = block_ops(block)
    heads = ops.heads(block)
    k, v = ops.kv(block, ops.norm1(block, prompts))
    return ops.keys(block, _heads(k, heads)), _heads(v, heads)


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
    ops = block_ops(block)
    heads = ops.heads(block)
    with nvtx_range(f"{name}/attn"):
        q, k, v = (_heads(t, heads) for t in ops.qkv(block, ops.norm1(block, x)))
        q, k = ops.queries_and_keys(block, q, k)
        if prompt_kv is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        elif prompt_kv[0].dim() == 4:  # one prompt set per sequence
            out = attention_with_own_prompts(q, k, v, prompt_kv[0], prompt_kv[1], causal)
        else:
            out = mixture_prefix_attention(q, k, v, prompt_kv[0], prompt_kv[1], candidate_lengths, weights,
                                           causal=causal, impl=impl)
        out = ops.merge(block, out)  # (B, N, W)
    if keep_rows is not None:
        rows = torch.arange(x.shape[0], device=x.device)
        x, out = x[rows, keep_rows].unsqueeze(1), out[rows, keep_rows].unsqueeze(1)
    with nvtx_range(f"{name}/mlp"):
        x = ops.residual_attention(block, x, ops.out_proj(block, out))
        return ops.residual_mlp(block, x)


def place_context(embeddings: torch.Tensor, context: torch.Tensor, slots: torch.Tensor | None = None,
                  start: int = 1) -> torch.Tensor:
    """CoOp-style learnable context in the token embeddings (S, L, W): ``context`` (n, W) for every
    sequence or (S, n, W) one per sequence, at positions start..start+n-1 (``slots`` None: the
    template's leading words after ``start`` special tokens, 1 for CLIP's start-of-text) or at
    ``slots`` (S, n) (a class token in front of or amid the context)."""
    sequences, _, width = embeddings.shape
    context = context.to(embeddings.dtype).expand(sequences, context.shape[-2], width)
    if slots is None:
        return torch.cat([embeddings[:, :start], context, embeddings[:, start + context.shape[1]:]], dim=1)
    index = slots.unsqueeze(-1).expand(-1, -1, width)
    return embeddings.scatter(1, index, context)
