"""The literal per-candidate loop: the oracle every other engine is tested against.

For candidate c with prompt keys/values ``pk_c, pv_c`` (rows ``offset_c ..
offset_c + n_c`` of ``prompt_k``/``prompt_v``) this runs one ordinary softmax
attention of ``q`` over ``[k ; pk_c]`` and ``[v ; pv_c]`` and returns

    O = sum_c weights[c] * softmax(q [k ; pk_c]^T * D^-0.5 + mask) [v ; pv_c]

where ``mask`` is causal on the original keys (``causal=True``) and leaves every
prompt key visible. This is exactly what the authors' supernet computes: one
full attention per candidate prompt length. It is deliberately simple and slow;
it never imports Triton and shares no code with the fused engines.
"""
from __future__ import annotations

from typing import Sequence

import torch


def candidate_offsets(candidate_lengths: Sequence[int]) -> list[int]:
    """Start row of each candidate's prompt inside the concatenated prompt_k."""
    offsets, total = [], 0
    for n in candidate_lengths:
        offsets.append(total)
        total += int(n)
    return offsets


def _attention(q, k, v, visible):
    """softmax(q k^T / sqrt(D)) v with invisible keys masked out, in q's dtype."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def reference_mixture_prefix_attention(q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal=False):
    """One full attention per candidate, then the weighted sum (see module docstring)."""
    batch, heads, n_queries, _ = q.shape
    # Sum in the promoted dtype (bf16 outputs times fp32 weights sum in fp32), as torch would.
    out = torch.zeros_like(q, dtype=torch.promote_types(q.dtype, weights.dtype))
    original_visible = torch.ones(n_queries, n_queries, dtype=torch.bool, device=q.device)
    if causal:
        original_visible = original_visible.tril()
    for c, (offset, length) in enumerate(zip(candidate_offsets(candidate_lengths), candidate_lengths)):
        # The prompt is shared by every sequence: broadcast it over the batch here
        # (the reference may spend memory; the fused engines never do this).
        pk = prompt_k[:, offset : offset + length].expand(batch, heads, length, -1)
        pv = prompt_v[:, offset : offset + length].expand(batch, heads, length, -1)
        prompt_visible = torch.ones(n_queries, length, dtype=torch.bool, device=q.device)
        visible = torch.cat([original_visible, prompt_visible], dim=1)
        out_c = _attention(q, torch.cat([k, pk], dim=2), torch.cat([v, pv], dim=2), visible)
        out = out + weights[c] * out_c.to(out.dtype)
    return out.to(q.dtype)
