"""The eager engine: all candidates as one attention, in plain PyTorch (any device).

Every candidate shares the queries and the original keys, so with one row
maximum ``m`` (natural log units, scale = D^-0.5)

    s_ij = q_i.k_j * scale         t_ip = q_i.pk_p * scale   (scale: D^-0.5 unless given)
    Z_c  = sum_j e^(s_ij - m) + sum_{p in c} e^(t_ip - m)
    gamma_c = w_c / Z_c            beta = sum_c gamma_c
    O_i  = beta * sum_j e^(s_ij - m) v_j + sum_p gamma_{c(p)} e^(t_ip - m) pv_p

which equals sum_c w_c softmax-attention over [k ; pk_c] (DESIGN.md section 2). Hidden
keys (causal, key_mask) drop out of the sums; a candidate with Z_c = 0 (it sees no
key in that row) gets gamma_c = 0, so it contributes zeros, as the reference defines.
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


def _future_mask(n_queries: int, n_keys: int, device) -> torch.Tensor:
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).triu(n_keys - n_queries + 1)


# Built once per (lengths, device, dtype) / (N, N_k, device): no tensor construction and no
# host-to-device copy per call. torch.compile traces the builders instead (constants).
_cached_segment_matrix = lru_cache(maxsize=64)(_segment_matrix)
_cached_future_mask = lru_cache(maxsize=64)(_future_mask)


def segment_matrix(candidate_lengths: Sequence[int], device, dtype=torch.float32) -> torch.Tensor:
    """(P, C) one-hot: entry [p, c] is 1 when prompt row p belongs to candidate c."""
    lengths = tuple(int(n) for n in candidate_lengths)
    if torch.compiler.is_compiling():
        return _segment_matrix(lengths, torch.device(device), dtype)
    return _cached_segment_matrix(lengths, torch.device(device), dtype)


def future_mask(n_queries: int, device, n_keys: int | None = None) -> torch.Tensor:
    """(N, N_k) bool: True where key j lies after query i's position i + N_k - N (hidden by causal)."""
    n_keys = n_queries if n_keys is None else n_keys
    if torch.compiler.is_compiling():
        return _future_mask(n_queries, n_keys, device)
    return _cached_future_mask(int(n_queries), int(n_keys), torch.device(device))


def hidden_keys(n_queries, n_keys, causal, key_mask, device):
    """Which original keys each query may not see, broadcastable to (B, H_kv, G, N, N_k); None: all seen."""
    hidden = future_mask(n_queries, device, n_keys) if causal else None
    if key_mask is not None:
        padding = ~key_mask[:, None, None, None, :]
        hidden = padding if hidden is None else hidden | padding
    return hidden


def eager_mixture_prefix_attention(q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal=False,
                                   scale=None, key_mask=None):
    """Concatenated single-attention form of the mixture (see module docstring)."""
    batch, heads, n_queries, head_dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)  # float64 stays float64 (gradcheck)
    # The G query heads of one key/value head as G * N rows: one matmul per key/value head, and
    # no copy of k, v or the prompts over the group (a copy of q only if it is not contiguous).
    q_rows = q.to(acc).reshape(batch, kv_heads, group * n_queries, head_dim)
    scores = (q_rows @ k.to(acc).transpose(-1, -2)) * scale  # (B, H_kv, G * N, N_k)
    hidden = hidden_keys(n_queries, n_keys, causal, key_mask, q.device)
    if hidden is not None:
        grouped = scores.view(batch, kv_heads, group, n_queries, n_keys).masked_fill(hidden, float("-inf"))
        scores = grouped.view(batch, kv_heads, group * n_queries, n_keys)
    row_max = scores.amax(dim=-1)
    has_prompts = prompt_k.shape[1] > 0
    if has_prompts:
        # (B, H_kv, G * N, D) @ (H_kv, D, P) broadcasts over B without copying the prompts' rows.
        prompt_scores = (q_rows @ prompt_k.to(acc).transpose(-1, -2)) * scale
        row_max = torch.maximum(row_max, prompt_scores.amax(dim=-1))
    # The result does not depend on m (detached: autograd stays away from amax); a row that
    # sees no key at all has m = -inf, replaced by 0 so that its e^(s - m) are 0, not NaN.
    row_max = torch.nan_to_num(row_max.detach(), neginf=0.0).unsqueeze(-1)

    probs = torch.exp(scores - row_max)
    denominators = probs.sum(dim=-1, keepdim=True).expand(*probs.shape[:-1], len(candidate_lengths))
    if has_prompts:
        segments = segment_matrix(candidate_lengths, q.device, acc)
        prompt_probs = torch.exp(prompt_scores - row_max)
        denominators = denominators + prompt_probs @ segments  # Z_c, (B, H_kv, G * N, C)
    # Z_c = 0: candidate c sees no key in this row and contributes nothing (gamma_c = 0). The
    # division runs on a safe denominator, so that neither branch's gradient is NaN.
    seen = denominators > 0
    gamma = torch.where(seen, weights.to(acc) / torch.where(seen, denominators, 1.0), 0.0)
    beta = gamma.sum(dim=-1, keepdim=True)
    out = beta * (probs @ v.to(acc))
    if has_prompts:
        weighted_prompt_probs = prompt_probs * (gamma @ segments.T)  # gamma_{c(p)} e^(t - m)
        out = out + weighted_prompt_probs @ prompt_v.to(acc)
    return out.reshape(batch, heads, n_queries, head_dim).to(q.dtype)
