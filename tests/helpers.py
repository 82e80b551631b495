"""Test helpers: seeded input factories, the float64 oracle, mismatch reports, poisoning."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from fastdpl.ops import mixture_prefix_attention, triton_interpreted

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = triton_interpreted()
# Triton runs on CUDA, or anywhere under the interpreter.
TRITON_DEVICE = DEVICE if DEVICE.type == "cuda" else (torch.device("cpu") if INTERPRETED else None)

# Normalised max error |x - ref| / max|ref| allowed per dtype for the float64/float32
# engines, and for the torch engines run in 16 bits (whose own roundings set the bar).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# Low precision (FlashAttention's rule): a fused result may be at most EAGER_MULTIPLE
# times as far from the float64 oracle as the eager engine in the same dtype, plus one
# rounding to that dtype (its unit roundoff) relative to the largest reference value.
EAGER_MULTIPLE = 2.0
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    n: int
    head_dim: int
    lengths: tuple
    causal: bool

    def __str__(self):
        lengths = "-".join(map(str, self.lengths))
        return f"B{self.batch}H{self.heads}N{self.n}D{self.head_dim}L{lengths}{'c' if self.causal else ''}"


def make_inputs(case: Case, dtype, device, seed: int, weight_scale: float = 1.0):
    """Fresh random q, k, v, prompt_k, prompt_v (dtype) and softmax weights (float32), leaf tensors."""
    gen = torch.Generator().manual_seed(seed)
    n_prompt = sum(case.lengths)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    qkv = [randn(case.batch, case.heads, case.n, case.head_dim) for _ in range(3)]
    prompts = [randn(case.heads, n_prompt, case.head_dim) for _ in range(2)]
    logits = torch.randn(len(case.lengths), generator=gen, dtype=torch.float64) * weight_scale
    weights = torch.softmax(logits, 0).to(torch.float32).to(device)
    tensors = [t.requires_grad_() for t in (*qkv, *prompts, weights)]
    grad_out = randn(case.batch, case.heads, case.n, case.head_dim)
    return tensors, grad_out


def run_with_grads(tensors, grad_out, case: Case, impl: str):
    """Output and the gradients of all six differentiable inputs."""
    q, k, v, pk, pv, w = tensors
    out = mixture_prefix_attention(q, k, v, pk, pv, case.lengths, w, causal=case.causal, impl=impl)
    # materialize_grads: with no prompt rows at all (P = 0) the torch engines never touch them.
    grads = torch.autograd.grad(out, tensors, grad_out, allow_unused=True, materialize_grads=True)
    return (out.detach(), *grads)


def float64_oracle(tensors, grad_out, case: Case):
    """The literal per-candidate loop in float64 on the CPU."""
    wide = [t.detach().to("cpu", torch.float64).requires_grad_() for t in tensors]
    return [r.cpu() for r in run_with_grads(wide, grad_out.to("cpu", torch.float64), case, "reference")]


NAMES = ("out", "dq", "dk", "dv", "dprompt_k", "dprompt_v", "dweights")


def normalised_error(actual, expected) -> float:
    if expected.numel() == 0:
        return 0.0
    expected = expected.to(torch.float64)
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.detach().cpu().to(torch.float64) - expected).abs().max() / scale).item()


def assert_matches(actual, expected, tol: float, name: str):
    """Fail with where and by how much ``actual`` is off (normalised by max|expected|)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().cpu().to(torch.float64)
    assert torch.isfinite(a).all(), f"{name}: {(~torch.isfinite(a)).sum().item()} non-finite elements (unwritten?)"
    if expected.numel() == 0:
        return
    err = normalised_error(a, expected)
    if err > tol:
        diff = (a - expected).abs()
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{name}: normalised error {err:.3e} > {tol:.1e}; worst at {where}: "
            f"got {a[where].item():.6g}, expected {expected[where].item():.6g}"
        )


@contextlib.contextmanager
def poisoned_allocations():
    """Make torch.empty / empty_like return NaN-filled (or -1) tensors, so unwritten output shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t.fill_(-1)

    def empty(*args, **kwargs):
        return poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison(real_empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def design_backward64(tensors, grad_out, case: Case, out):
    """The backward formulas of DESIGN.md section 2, written out in float64.

    Takes the forward output ``out`` as given and recovers dO.(original part) from
    dO.O, as DESIGN.md describes; with the exact output this must equal autograd
    through the reference loop. (The fused kernels read that term from the
    original keys' own output instead; see fastdpl/kernels/backward.py.)
    """
    q, k, v, pk, pv, w = (t.detach().cpu().to(torch.float64) for t in tensors)
    d_out, out = grad_out.cpu().to(torch.float64), out.cpu().to(torch.float64)
    n, scale = case.n, case.head_dim ** -0.5
    seg = torch.repeat_interleave(torch.arange(len(case.lengths)), torch.tensor(case.lengths))
    onehot = torch.nn.functional.one_hot(seg, len(case.lengths)).to(torch.float64)  # (P, C)
    s = q @ k.transpose(-1, -2) * scale
    if case.causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    t = q @ pk.transpose(-1, -2) * scale
    m = torch.maximum(s.amax(-1), t.amax(-1) if t.shape[-1] else s.amax(-1)).unsqueeze(-1)
    p_x, p_t = torch.exp(s - m), torch.exp(t - m)
    z = p_x.sum(-1, keepdim=True) + p_t @ onehot
    gamma = w / z
    beta = gamma.sum(-1, keepdim=True)
    do_pv = d_out @ pv.transpose(-1, -2)
    y = (p_t * do_pv) @ onehot
    x = ((d_out * out).sum(-1, keepdim=True) - (gamma * y).sum(-1, keepdim=True)) / beta
    d = (x + y) / z
    delta = (gamma * d).sum(-1, keepdim=True)
    ds = p_x * (beta * (d_out @ v.transpose(-1, -2)) - delta)
    weighted_t = p_t * (gamma @ onehot.T)
    dt = weighted_t * (do_pv - d @ onehot.T)
    dq = (ds @ k + dt @ pk) * scale
    dk = ds.transpose(-1, -2) @ q * scale
    dv = (p_x * beta).transpose(-1, -2) @ d_out
    dpk = (dt.transpose(-1, -2) @ q).sum(0) * scale
    dpv = (weighted_t.transpose(-1, -2) @ d_out).sum(0)
    dw = d.sum((0, 1, 2))
    return dq, dk, dv, dpk, dpv, dw


def tiny_clip(seed: int = 0, **text_overrides):
    """A small open_clip CLIP with random weights (no download): ViT 32px/8px patches, 3 blocks each."""
    from fastdpl.bench.step import tiny_clip as build

    return build(seed, **text_overrides)


CLASSNAMES = ["cat", "golden_retriever", "sea lion", "airplane", "a very long class name with many words"]


def stop_after_checkpoint(monkeypatch, epoch: int, error=KeyboardInterrupt):
    """Make the training loop raise ``error`` right after it writes the checkpoint of ``epoch`` (or
    round), as a killed run would stop; returns a function that restores the loop."""
    from fastdpl.pipeline import training

    save = training._save_checkpoint

    def save_then_stop(job, out, done, *rest):
        save(job, out, done, *rest)
        if done == epoch:
            raise error

    monkeypatch.setattr(training, "_save_checkpoint", save_then_stop)
    return lambda: monkeypatch.setattr(training, "_save_checkpoint", save)
