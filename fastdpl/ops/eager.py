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

from functools import lru_cache
from typing import Sequence

import torch


def _segment_matrix(candidate_lengths: tuple, device, dtype) -> torch.Tensor:
    rows = [[float(c == k) for k in range(len(candidate_lengths))]
            for c, n in enumerate(candidate_lengths) for _ in range(n)]
    return torch.tensor(rows, dtype=dtype, device=device).reshape(sum(candidate_lengths), len(candidate_lengths))


def _future_mask(n_queries: int, device) -> torch.Tensor:
    return torch.ones(n_queries, n_queries, dtype=torch.bool, device=device).triu(1)


# Built once per (lengths, device, dtype) / (N, device): no tensor construction and no
# host-to-device copy per call. torch.compile traces the builders instead (constants).
_cached_segment_matrix = lru_cache(maxsize=64)(_segment_matrix)
_cached_future_mask = lru_cache(maxsize=64)(_future_mask)


def segment_matrix(candidate_lengths: Sequence[int], device, dtype=torch.float32) -> torch.Tensor:
    """(P, C) one-hot: entry [p, c] is 1 when prompt row p belongs to candidate c."""
    lengths = tuple(int(n) for n in candidate_lengths)
    if torch.compiler.is_compiling():
        return _segment_matrix(lengths, torch.device(device), dtype)
    return _cached_segment_matrix(lengths, torch.device(device), dtype)


def future_mask(n_queries: int, device) -> torch.Tensor:
    """(N, N) bool: True above the diagonal (keys a causal query may not see)."""
    if torch.compiler.is_compiling():
        return _future_mask(n_queries, device)
    return _cached_future_mask(int(n_queries), torch.device(device))


def eager_mixture_prefix_attention(q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal=False):
    """Concatenated single-attention form of the mixture (see module docstring)."""
    n_queries, scale = q.shape[2], q.shape[-1] ** -0.5
    acc = torch.promote_types(q.dtype, torch.float32)  # float64 stays float64 (gradcheck)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale  # (B, H, N, N)
    if causal:
        scores = scores.masked_fill(future_mask(n_queries, q.device), float("-inf"))
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
        segments = segment_matrix(candidate_lengths, q.device, acc)
        prompt_probs = torch.exp(prompt_scores - row_max)
        denominators = denominators + prompt_probs @ segments  # Z_c, (B, H, N, C)
    gamma = weights.to(acc) / denominators
    beta = gamma.sum(dim=-1, keepdim=True)
    out = beta * (probs @ v.to(acc))
    if has_prompts:
        weighted_prompt_probs = prompt_probs * (gamma @ segments.T)  # gamma_{c(p)} e^(t - m)
        out = out + weighted_prompt_probs @ prompt_v.to(acc)
    return out.to(q.dtype)
