"""The eager engine: all candidates as one attention, in plain PyTorch (any device).

Every candidate shares the queries and the original keys, so with one row
maximum ``m`` (natural log units, scale = D^-0.5)

    s_ij = q_i.k_j * scale         t_ip = q_i.pk_p * scale
    Z_c  = sum_j e^(s_ij - m) + sum_{p in c} e^(t_ip - m)
    gamma_c = w_c / Z_c            beta = sum_c gamma_c
    O_i  = beta * sum_j e^(s_ij - m) v_j + sum_p gamma_{c(p)} e^(t_ip - m) pv_p

which equals sum_c w_c softmax-attention over [k ; pk_c] (DESIGN.md section 2).
One pass over N + P keys instead of C passes over N + n_c keys; gradients come
from autograd. Everything after reading the inputs runs in float32 (float64 for
float64 inputs): the scores, like the fused kernel's fp32 accumulators, and the
value products too, so that dO.v is never rounded to bf16 before the
cancellation in beta dO.v - delta. Only the output is cast back.
"""
from __future__ import annotations

from typing import Sequence

import torch


def segment_matrix(candidate_lengths: Sequence[int], device) -> torch.Tensor:
    """(P, C) float32 one-hot: entry [p, c] is 1 when prompt row p belongs to candidate c."""
    segment_ids = torch.repeat_interleave(
        torch.arange(len(candidate_lengths), device=device),
        torch.tensor(list(candidate_lengths), dtype=torch.long, device=device),
        output_size=sum(candidate_lengths),
    )
    return torch.nn.functional.one_hot(segment_ids, len(candidate_lengths)).to(torch.float32)


def eager_mixture_prefix_attention(q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal=False):
    """Concatenated single-attention form of the mixture (see module docstring)."""
    n_queries, scale = q.shape[2], q.shape[-1] ** -0.5
    acc = torch.promote_types(q.dtype, torch.float32)  # float64 stays float64 (gradcheck)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale  # (B, H, N, N)
    if causal:
        future = torch.ones(n_queries, n_queries, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    row_max = scores.amax(dim=-1)
    has_prompts = prompt_k.shape[1] > 0
    if has_prompts:
        # (B, H, N, D) @ (H, D, P) broadcasts over B without copying the prompts.
        prompt_scores = (q.to(acc) @ prompt_k.to(acc).transpose(-1, -2)) * scale
        row_max = torch.maximum(row_max, prompt_scores.amax(dim=-1))
    # The result does not depend on m; detaching keeps autograd away from amax.
    row_max = row_max.detach().unsqueeze(-1)

    probs = torch.exp(scores - row_max)
    denominators = probs.sum(dim=-1, keepdim=True).expand(*probs.shape[:-1], len(candidate_lengths))
    if has_prompts:
        segments = segment_matrix(candidate_lengths, q.device).to(acc)
        prompt_probs = torch.exp(prompt_scores - row_max)
        denominators = denominators + prompt_probs @ segments  # Z_c, (B, H, N, C)
    gamma = weights.to(acc) / denominators
    beta = gamma.sum(dim=-1, keepdim=True)
    out = beta * (probs @ v.to(acc))
    if has_prompts:
        weighted_prompt_probs = prompt_probs * (gamma @ segments.T)  # gamma_{c(p)} e^(t - m)
        out = out + weighted_prompt_probs @ prompt_v.to(acc)
    return out.to(q.dtype)
