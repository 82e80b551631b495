"""What a user would otherwise run, for side-by-side benchmarks of the op.

Every peer has the op's signature ``(q, k, v, prompt_k, prompt_v,
candidate_lengths, weights, causal) -> out`` and is differentiable.

* ``lse_merge_*``: one attention over the original keys that also returns its
  log-sum-exp, plus each candidate's prompt-only attention (tiny, N x n_c
  scores), merged per candidate with the LSE rule
  ``out_c = (e^lse_x out_x + e^lse_c out_pc) / (e^lse_x + e^lse_c)`` and summed
  with the weights. The x-part runs on xformers (CUDA), FlexAttention, or plain
  math (materialised scores) where neither runs.
* ``sdpa_single_path``: the floor: one prompted attention over N + n keys
  (n = max(lengths) for "a single path", or sum(lengths)), as one SDPA call,
  on PyTorch's own choice of backend or on one named backend (flash, cuDNN,
  efficient, math). The prompt keys go first and a causal tower uses a
  lower-right causal mask (query i sees every prompt and original keys <= i),
  which the flash and efficient backends take without a dense mask.

Grouped-query attention (k, v and the prompts with H_kv < H heads): the SDPA
floor does what transformers' sdpa path does for a prefix-tuned layer. The
prefix makes the key length exceed the query length, so transformers
materialises the causal mask, and with a mask it does not pass ``enable_gqa``
on CUDA but repeats the key/value heads (``repeat_kv``, i.e.
``repeat_interleave(dim=1)``) of the concatenated [prefix ; keys] before one
SDPA call; so does ``sdpa_single_path`` (only its mask is the lower-right
causal bias, which lets flash/efficient run: a stricter floor than
transformers' dense mask). ``enable_gqa=True`` times SDPA's own grouped path
instead. ``lse_merge`` expands k, v and the prompts over the query heads
first, as a user wiring those kernels would.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from fastdpl.ops.reference import candidate_offsets


SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")


def repeat_kv(x, heads: int, dim: int = 1):
    """Key/value heads repeated up to ``heads`` query heads, kv head j serving query heads
    j*group .. (j+1)*group - 1 (transformers' repeat_kv order); ``x`` itself when they match."""
    group = heads // x.shape[dim]
    return x if group == 1 else x.repeat_interleave(group, dim=dim)


def sdpa_over_prefix(q, k, v, prompt_k, prompt_v, causal, backend: str | None = None, enable_gqa: bool = False):
    """One SDPA call over [prompt_k ; k] (prompts broadcast over the batch, as a prompted block
    does); ``backend`` names one of SDPA_BACKENDS, or None for PyTorch's own choice. Fewer
    key/value heads than query heads: repeated (repeat_kv) unless ``enable_gqa``."""
    batch, n_prompt = q.shape[0], prompt_k.shape[1]
    keys = torch.cat([prompt_k.unsqueeze(0).expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([prompt_v.unsqueeze(0).expand(batch, -1, -1, -1), v], dim=2)
    if not enable_gqa:
        keys, values = repeat_kv(keys, q.shape[1]), repeat_kv(values, q.shape[1])
    mask = causal_lower_right(q.shape[2], k.shape[2] + n_prompt) if causal else None
    extra = {"enable_gqa": True} if enable_gqa else {}
    if backend is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, **extra)
    with sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                      "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]):
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, **extra)


def sdpa_single_path(q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal, n_prompt, backend=None,
                     enable_gqa=False):
    """The floor: a single prompted attention with the first ``n_prompt`` prompt rows."""
    return sdpa_over_prefix(q, k, v, prompt_k[:, :n_prompt], prompt_v[:, :n_prompt], causal, backend, enable_gqa)


def _accumulation_dtype(q):
    return torch.promote_types(q.dtype, torch.float32)


def _x_attention_math(q, k, v, causal):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        n = q.shape[2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    scores = scores.to(_accumulation_dtype(q))
    return (torch.softmax(scores, -1).to(v.dtype) @ v), torch.logsumexp(scores, -1)


def _x_attention_xformers(q, k, v, causal):
    from xformers.ops.fmha import LowerTriangularMask
    from xformers.ops.fmha.merge_training import memory_efficient_attention_partial_autograd

    bias = LowerTriangularMask() if causal else None
    # xformers wants (B, N, H, D); its LSE comes back as (B, H, N).
    partial = memory_efficient_attention_partial_autograd(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    out, lse = partial.attn, partial.lse
    return out.transpose(1, 2), lse


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=False compiles once per shape and grad mode (2 per benchmark shape): past dynamo's
    # default limit of 8 it would silently run the unfused eager flex_attention for the later shapes.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def _x_attention_flex(q, k, v, causal):
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask

    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, q.shape[2], k.shape[2],
                                       device=q.device)
    out, aux = _compiled_flex()(q, k, v, block_mask=block_mask, return_aux=AuxRequest(lse=True))
    return out, aux.lse


X_ATTENTION = {"math": _x_attention_math, "xformers": _x_attention_xformers, "flex": _x_attention_flex}


def lse_merge(q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal, x_backend="math"):
    """Mixture by LSE merging of an x-only attention with each candidate's prompt-only attention.

    ``x_backend`` names an entry of X_ATTENTION, or is a callable
    ``(q, k, v, causal) -> (out, lse)`` with lse in natural-log units.
    """
    x_attention = X_ATTENTION[x_backend] if isinstance(x_backend, str) else x_backend
    heads = q.shape[1]  # grouped-query inputs: every part below runs on per-query-head copies
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    prompt_k, prompt_v = repeat_kv(prompt_k, heads, dim=0), repeat_kv(prompt_v, heads, dim=0)
    out_x, lse_x = x_attention(q, k, v, causal)
    acc = _accumulation_dtype(q)
    out_x, lse_x = out_x.to(acc), lse_x.to(acc).unsqueeze(-1)
    scale = q.shape[-1] ** -0.5
    total = torch.zeros_like(out_x)
    for c, (offset, n) in enumerate(zip(candidate_offsets(candidate_lengths), candidate_lengths)):
        if n == 0:
            total = total + weights[c] * out_x
            continue
        scores = ((q @ prompt_k[:, offset:offset + n].transpose(-1, -2)) * scale).to(acc)
        lse_p = torch.logsumexp(scores, -1, keepdim=True)
        out_p = torch.softmax(scores, -1) @ prompt_v[:, offset:offset + n].to(acc)
        lse = torch.logaddexp(lse_x, lse_p)
        total = total + weights[c] * (torch.exp(lse_x - lse) * out_x + torch.exp(lse_p - lse) * out_p)
    return total.to(q.dtype)
