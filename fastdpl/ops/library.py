"""torch.library registration of the fused engine (imports only torch).

Two custom ops joined by ``register_autograd``:

* ``fastdpl::mixture_attention_fwd(q, k, v, prompt_k, prompt_v, candidate_lengths,
  weights, causal, scale, key_mask) -> (out, out_x, row_max, row_sum, denominators)``
* ``fastdpl::mixture_attention_bwd(grad_out, ..., out_x, row_max, row_sum,
  denominators, causal, scale, key_mask) -> (dq, dk, dv, dprompt_k, dprompt_v, dweights)``

``key_mask`` is an optional (B, N_k) bool tensor (no gradient); ``scale`` a float.

Autograd saves ``out_x`` (the original keys' own attention output, which the
backward reads instead of ``out``; see fastdpl/kernels/forward.py), not ``out``: the
layer after the attention keeps its own copy of ``out``, so the saved
activations do not grow. Nothing is made contiguous: the kernels take strides.

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
    candidate_lengths: list[int], weights: Tensor, causal: bool, scale: float, key_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from fastdpl.kernels import mixture_attention_forward

    return mixture_attention_forward(q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal, scale,
                                     key_mask)


@mixture_attention_fwd.register_fake
def _(q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal, scale, key_mask):
    batch, heads, n_queries, _ = q.shape
    row_max = q.new_empty(batch, heads, n_queries, dtype=torch.float32)
    row_sum = q.new_empty(batch, heads, n_queries, dtype=torch.float32)
    denominators = q.new_empty(batch, heads, n_queries, len(candidate_lengths), dtype=torch.float32)
    return q.new_empty(q.shape), q.new_empty(q.shape), row_max, row_sum, denominators


@torch.library.custom_op("fastdpl::mixture_attention_bwd", mutates_args=())
def mixture_attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prompt_k: Tensor, prompt_v: Tensor,
    candidate_lengths: list[int], weights: Tensor, out_x: Tensor, row_max: Tensor, row_sum: Tensor,
    denominators: Tensor, causal: bool, scale: float, key_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from fastdpl.kernels import mixture_attention_backward

    return mixture_attention_backward(grad_out, q, k, v, prompt_k, prompt_v, candidate_lengths, weights,
                                      out_x, row_max, row_sum, denominators, causal, scale, key_mask)


@mixture_attention_bwd.register_fake
def _(grad_out, q, k, v, prompt_k, prompt_v, candidate_lengths, weights, out_x, row_max, row_sum, denominators,
      causal, scale, key_mask):
    return tuple(torch.empty_like(t) for t in (q, k, v, prompt_k, prompt_v, weights))


def _setup_context(ctx, inputs, output):
    q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal, scale, key_mask = inputs
    _, out_x, row_max, row_sum, denominators = output
    ctx.save_for_backward(q, k, v, prompt_k, prompt_v, weights, out_x, row_max, row_sum, denominators, key_mask)
    ctx.candidate_lengths, ctx.causal, ctx.scale = candidate_lengths, causal, scale
    ctx.mark_non_differentiable(out_x, row_max, row_sum, denominators)


def _backward(ctx, grad_out, *_grad_statistics):
    q, k, v, prompt_k, prompt_v, weights, out_x, row_max, row_sum, denominators, key_mask = ctx.saved_tensors
    grads = torch.ops.fastdpl.mixture_attention_bwd(
        grad_out, q, k, v, prompt_k, prompt_v, ctx.candidate_lengths, weights,
        out_x, row_max, row_sum, denominators, ctx.causal, ctx.scale, key_mask,
    )
    dq, dk, dv, dprompt_k, dprompt_v, dweights = grads
    return dq, dk, dv, dprompt_k, dprompt_v, None, dweights, None, None, None


torch.library.register_autograd(
    "fastdpl::mixture_attention_fwd", _backward, setup_context=_setup_context
)


def fused_mixture_prefix_attention(q, k, v, prompt_k, prompt_v, candidate_lengths, weights, causal=False,
                                   scale=None, key_mask=None):
    """The Triton engine through the registered op; returns only the output."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, *_statistics = torch.ops.fastdpl.mixture_attention_fwd(
        q, k, v, prompt_k, prompt_v, list(candidate_lengths), weights, causal, scale, key_mask
    )
    return out
