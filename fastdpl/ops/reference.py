"""The literal per-candidate loop: the oracle every other engine is tested against.

For candidate c with prompt keys/values ``pk_c, pv_c`` (rows ``offset_c ..
offset_c + n_c`` of ``prompt_k``/``prompt_v``) this runs one ordinary softmax
attention of ``q`` over ``[k ; pk_c]`` and ``[v ; pv_c]`` and returns

    O = sum_c weights[c] * softmax(scale * q [k ; pk_c]^T + mask) [v ; pv_c]

where ``mask`` hides, from query i (position i + N_k - N: the queries are the last
N of the N_k keys), the original keys past it when ``causal`` and the keys that
``key_mask`` marks as padding, and leaves every prompt key visible. A row that sees
no key at all under candidate c (only possible when n_c = 0) gets zeros from it.
Key/value head h // (H / H_kv) serves query head h. This is exactly what the
authors' supernet computes: one full attention per candidate prompt length. It is
deliberately simple and slow (it expands keys, values and prompts over heads and
batch); it never imports Triton and shares no code with the fused engines.
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


def original_visibility(batch, n_queries, n_keys, causal, key_mask, device) -> torch.Tensor:
    """(B, 1, N, N_k) bool: which original keys each query sees."""
    visible = torch.ones(batch, 1, n_queries, n_keys, dtype=torch.bool, device=device)
    if causal:  # query i sits at position i + N_k - N
        visible = visible & torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(n_keys - n_queries)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    return visible


def _attention(q, k, v, visible, scale):
    """softmax(scale q k^T) v over the visible keys, in q's dtype; zeros where a row sees none.

    Such rows get scores 0 before the softmax (not -inf everywhere, whose softmax is NaN and
    whose backward would be NaN too) and their probabilities are then zeroed."""
    seen = visible.any(-1, keepdim=True)
    scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores.masked_fill(~seen, 0.0), dim=-1) * seen
    return probs @ v


def reference_mixture_prefix_attention(q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal=False,
                                       scale=None, key_mask=None):
    """One full attention per candidate, then the weighted sum (see module docstring)."""
    batch, heads, n_queries, head_dim = q.shape
    n_keys, group = k.shape[2], heads // k.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    # Grouped-query attention the way transformers' repeat_kv spells it: head h reads h // group.
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    prompt_k, prompt_v = prompt_k.repeat_interleave(group, dim=0), prompt_v.repeat_interleave(group, dim=0)
    # Sum in the promoted dtype (bf16 outputs times fp32 weights sum in fp32), as torch would.
    out = torch.zeros_like(q, dtype=torch.promote_types(q.dtype, weights.dtype))
    original_visible = original_visibility(batch, n_queries, n_keys, causal, key_mask, q.device)
    for c, (offset, length) in enumerate(zip(candidate_offsets(candidate_lengths), candidate_lengths)):
        # The prompt is shared by every sequence: broadcast it over the batch here
        # (the reference may spend memory; the fused engines never do this).
        pk = prompt_k[:, offset : offset + length].expand(batch, heads, length, -1)
        pv = prompt_v[:, offset : offset + length].expand(batch, heads, length, -1)
        prompt_visible = torch.ones(batch, 1, n_queries, length, dtype=torch.bool, device=q.device)
        visible = torch.cat([original_visible, prompt_visible], dim=-1)
        out_c = _attention(q, torch.cat([k, pk], dim=2), torch.cat([v, pv], dim=2), visible, scale)
        out = out + weights[c] * out_c.to(out.dtype)
    return out.to(q.dtype)
