"""The authors'-style DPL forward, written literally: the oracle for FastDPLPrompt and the
baseline of the module benchmark.

For every block and every candidate prompt P_c it runs the block's own
``nn.MultiheadAttention`` with queries ``ln_1(x)`` and keys/values
``ln_1([x ; P_c])`` (prompts broadcast over the batch; in the text tower a mask
that is causal on the original tokens and open on the prompts), then the
softmax(alpha)-weighted sum, then the rest of the block. The text tower runs on
all 77 positions and the last block on every row: none of FastDPLPrompt's
savings, and nothing shared with its code beyond reading the same parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .towers import image_embeddings, image_head, text_embeddings, text_head


def _candidates(dpl, tower: str, block: int):
    """[(weight, prompt or None)] of one block, as FastDPLPrompt holds them."""
    if tower not in dpl.prompted:
        return [(None, None)]
    lengths = dpl.prompted[tower][block]
    if dpl.mode == "search":
        weights = torch.softmax(dpl.arch_logits[tower][block], dim=0)
    else:
        weights = [None]
    return [(weights[c], dpl.prompt(tower, block, n) if n > 0 else None) for c, n in enumerate(lengths)]


def _literal_block(block, x, candidates, causal_mask):
    h = block.ln_1(x)
    out = 0
    for weight, prompt in candidates:
        if prompt is None:
            kv, mask = h, causal_mask
        else:
            expanded = prompt.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            kv = block.ln_1(torch.cat([x, expanded], dim=1))
            mask = None if causal_mask is None else F.pad(causal_mask, (0, prompt.shape[0]))  # prompts: 0 = open
        attended = block.attn(h, kv, kv, need_weights=False, attn_mask=mask)[0]
        out = out + (attended if weight is None else weight * attended)
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def literal_encode_image(dpl, images: torch.Tensor) -> torch.Tensor:
    visual = dpl.model.visual
    x = image_embeddings(visual, images.to(visual.conv1.weight.dtype))
    for b, block in enumerate(dpl._parts["image"].blocks):
        x = _literal_block(block, x, _candidates(dpl, "image", b), None)
    return image_head(visual, x[:, 0])


def literal_encode_text(dpl) -> torch.Tensor:
    tokens = dpl.class_tokens
    x = text_embeddings(dpl.model, tokens)
    n = tokens.shape[1]
    causal = torch.full((n, n), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
    for b, block in enumerate(dpl._parts["text"].blocks):
        x = _literal_block(block, x, _candidates(dpl, "text", b), causal)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    return text_head(dpl.model, x[rows, dpl.end_of_text])


def literal_logits(dpl, images: torch.Tensor) -> torch.Tensor:
    image_features = F.normalize(literal_encode_image(dpl, images), dim=-1)
    text_features = F.normalize(literal_encode_text(dpl), dim=-1)
    return dpl.model.logit_scale.exp() * image_features @ text_features.T
