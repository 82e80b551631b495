"""torch.library registration of the fused engine (imports only torch).

Two custom ops joined by ``register_autograd``:

* ``fastdpl::mixture_attention_fwd(q, k, v, prompt_k, prompt_v, candidate_lengths,
  weights, causal) -> (out, row_max, denominators)``
* ``fastdpl::mixture_attention_bwd(grad_out, ..., out, row_max, denominators, causal)
  -> (dq, dk, dv, dprompt_k, dprompt_v, dweights)``

Each has a fake (meta) implementation, so ``torch.compile(fullgraph=True)``
traces them as opaque nodes with symbolic shapes. The Triton kernels are
imported on first call, never at import time.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("fastdpl::mixture_attention_fwd", mutates_args=())
def mixture_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, prompt_k: Tensor, prompt_v: Tensor,
    candidate_lengths: list[int], weights: Tensor, causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from fastdpl.kernels import mixture_attention_forward

    return mixture_attention_forward(q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal)


@mixture_attention_fwd.register_fake
def _(q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal):
    batch, heads, n_queries, _ = q.shape
    row_max = q.new_empty(batch, heads, n_queries, dtype=torch.float32)
    denominators = q.new_empty(batch, heads, n_queries, len(candidate_lengths), dtype=torch.float32)
    return torch.empty_like(q), row_max, denominators


@torch.library.custom_op("fastdpl::mixture_attention_bwd", mutates_args=())
def mixture_attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prompt_k: Tensor, prompt_v: Tensor,
    candidate_lengths: list[int], weights: Tensor, out: Tensor, row_max: Tensor, denominators: Tensor,
    causal: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from fastdpl.kernels import mixture_attention_backward

    return mixture_attention_backward(grad_out, q, k, v, prompt_k, prompt_v, candidate_lengths, weights,
                                      out, row_max, denominators, causal)


@mixture_attention_bwd.register_fake
def _(grad_out, q, k, v, prompt_k, prompt_v, candidate_lengths, weights, out, row_max, denominators, causal):
    return tuple(torch.empty_like(t) for t in (q, k, v, prompt_k, prompt_v, weights))


def _setup_context(ctx, inputs, output):
    q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal = inputs
    out, row_max, denominators = output
    ctx.save_for_backward(q, k, v, prompt_k, prompt_v, weights, out, row_max, denominators)
    ctx.candidate_lengths, ctx.causal = candidate_lengths, causal
    ctx.mark_non_differentiable(row_max, denominators)


def _backward(ctx, grad_out, _grad_row_max, _grad_denominators):
    q, k, v, prompt_k, prompt_v, weights, out, row_max, denominators = ctx.saved_tensors
    grads = torch.ops.fastdpl.mixture_attention_bwd(
        grad_out.contiguous(), q, k, v, prompt_k, prompt_v, ctx.candidate_lengths, weights,
        out, row_max, denominators, ctx.causal,
    )
    dq, dk, dv, dprompt_k, dprompt_v, dweights = grads
    return dq, dk, dv, dprompt_k, dprompt_v, None, dweights, None


torch.library.register_autograd(
    "fastdpl::mixture_attention_fwd", _backward, setup_context=_setup_context
)


def fused_mixture_prefix_attention(q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal=False):
    """The Triton engine through the registered op; returns only the output."""
    out, _, _ = torch.ops.fastdpl.mixture_attention_fwd(
        q, k, v, prompt_k, prompt_v, list(candidate_lengths), weights, causal
    )
    return out
