"""Numerics of every engine of mixture_prefix_attention against a float64 oracle.

The oracle is the literal per-candidate loop in float64 (itself checked against
a per-candidate torch SDPA loop below). Inputs are fresh random draws per case;
the fused engine's buffers are poisoned with NaN before it runs.
"""
import itertools
import zlib

import pytest
import torch

from fastdpl.ops import mixture_prefix_attention
from helpers import (
    DEVICE, EAGER_MULTIPLE, NAMES, TOLERANCE, TRITON_DEVICE, UNIT_ROUNDOFF, Case, assert_matches,
    design_backward64, float64_oracle, make_inputs, normalised_error, poisoned_allocations, run_with_grads,
)

FULL, IRREGULAR = (0, 1, 2, 3, 4, 5, 6), (0, 3, 0, 9)


def _covering_cases():
    """Every N x causal x lengths combination; D, H and B cycle so each value shows up with each N.
    N = 197 (the image tower, never causal) runs without the mask: causal masking over many
    tiles with a ragged last one is covered at N = 77 here and N = 257 in EDGE_CASES."""
    cases = []
    for i, (n, causal, lengths) in enumerate(itertools.product((1, 17, 77, 197), (False, True), (FULL, IRREGULAR))):
        if n == 197 and causal:
            continue
        cases.append(Case(batch=(1, 2)[i % 2], heads=(1, 3)[(i // 2) % 2], n=n,
                          head_dim=(32, 64)[(i // 4) % 2], lengths=lengths, causal=causal))
    return cases


CASES = _covering_cases()
# Shapes at the edges of what the kernel supports: head dims 16/80/128, N past 256,
# one candidate, no prompts at all, a long irregular candidate list.
EDGE_CASES = [
    Case(2, 2, 257, 16, (0, 1, 2, 3, 4, 5, 6), True),
    Case(1, 2, 65, 80, (2, 0, 5), False),
    Case(2, 1, 33, 128, (4,), True),
    Case(2, 2, 40, 32, (0,), False),
    Case(1, 2, 50, 48, (0, 0, 0), True),
    Case(1, 3, 20, 64, tuple(range(17)), False),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The literal loop in bf16 runs softmax, attention and the weight gradient's sum in
# bf16 (measured: up to ~0.1 normalised error on dweights); it is the oracle only in float64.
LITERAL_HALF_SLACK = 5.0
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton needs CUDA or TRITON_INTERPRET=1")


def _seed(*parts):
    """A fixed seed per test case (Python's hash() of strings changes from run to run)."""
    return zlib.crc32(repr(parts).encode())


def _device_for(impl):
    return TRITON_DEVICE if impl == "triton" else DEVICE


def _check_against_oracle(case, dtype, impl, seed, prompt_scale=1.0):
    tensors, grad_out = make_inputs(case, dtype, _device_for(impl), seed)
    if prompt_scale != 1.0:  # prompt keys that dominate the attention of every row
        with torch.no_grad():
            tensors[3].mul_(prompt_scale)
    expected = float64_oracle(tensors, grad_out, case)
    with poisoned_allocations():
        actual = run_with_grads(tensors, grad_out, case, impl)
    for name, a in zip(NAMES, actual):
        assert a.dtype == (torch.float32 if name == "dweights" else dtype), f"{name} has dtype {a.dtype}"
    if impl == "triton" and dtype in UNIT_ROUNDOFF:
        # Against the independent oracle: at most twice the eager engine's error in
        # the same dtype, plus one rounding to that dtype (FlashAttention's rule).
        eager = run_with_grads(tensors, grad_out, case, "eager")
        tolerances = [EAGER_MULTIPLE * normalised_error(b, e) + UNIT_ROUNDOFF[dtype] for b, e in zip(eager, expected)]
    else:
        floor = TOLERANCE[dtype] * (LITERAL_HALF_SLACK if impl == "reference" and dtype in UNIT_ROUNDOFF else 1)
        tolerances = [floor] * len(NAMES)
    for name, a, e, tol in zip(NAMES, actual, expected, tolerances):
        assert_matches(a, e, tol, f"{impl}/{dtype}/{case}/{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", ["reference", "eager"])
def test_torch_engines_match_float64_oracle(impl, case, dtype):
    _check_against_oracle(case, dtype, impl, seed=_seed(impl, case, dtype))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_float64_oracle(case, dtype):
    _check_against_oracle(case, dtype, "triton", seed=_seed("triton", case, dtype))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", EDGE_CASES, ids=str)
def test_triton_edge_shapes_match_float64_oracle(case, dtype):
    _check_against_oracle(case, dtype, "triton", seed=_seed("edge", case, dtype))


# Rows the prompts dominate: one original key (N = 1), the first rows of a causal
# text tower, prompt keys scaled up. The old backward recovered the original keys'
# part from dO.O / beta and was ~16x the eager error here (dk in bf16).
PROMPT_DOMINATED = [Case(2, 2, 1, 16, (0, 0, 6, 2), True), Case(1, 3, 5, 32, (0, 2, 4, 6), True),
                    Case(2, 1, 70, 64, (0, 1, 2, 3, 4, 5, 6), True)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", PROMPT_DOMINATED, ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_triton_low_precision_prompt_dominated_rows(case, dtype, seed):
    _check_against_oracle(case, dtype, "triton", seed=_seed("dominated", case, dtype, seed), prompt_scale=3.0)


@needs_triton
def test_triton_handles_peaked_scores_and_uneven_weights():
    """Large logits (prompt keys dominating some rows) and near one-hot weights stay accurate."""
    case = Case(2, 2, 77, 32, FULL, True)
    tensors, grad_out = make_inputs(case, torch.float32, TRITON_DEVICE, seed=7, weight_scale=4.0)
    with torch.no_grad():
        tensors[3].mul_(4.0)  # prompt_k: prompt scores up to ~+-30
        tensors[0].mul_(2.0)
    expected = float64_oracle(tensors, grad_out, case)
    actual = run_with_grads(tensors, grad_out, case, "triton")
    for name, a, e in zip(NAMES, actual, expected):
        assert_matches(a, e, 1e-4, f"peaked/{name}")


@needs_triton
def test_triton_accepts_non_contiguous_inputs():
    """q, k, v as strided views of one packed projection (the layout attention modules produce)."""
    case = Case(2, 3, 30, 32, IRREGULAR, False)
    gen = torch.Generator().manual_seed(3)
    packed = torch.randn(case.batch, case.n, 3, case.heads, case.head_dim, generator=gen).to(TRITON_DEVICE)
    packed.requires_grad_()
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D), non-contiguous
    tensors, grad_out = make_inputs(case, torch.float32, TRITON_DEVICE, seed=4)
    pk, pv, w = tensors[3:]
    out = mixture_prefix_attention(q, k, v, pk, pv, case.lengths, w, impl="triton")
    grads = torch.autograd.grad(out, (packed, pk, pv, w), grad_out)
    wide = [t.detach().double().requires_grad_() for t in (packed, pk, pv, w)]
    q64, k64, v64 = wide[0].permute(2, 0, 3, 1, 4).unbind(0)
    pk64, pv64, w64 = wide[1:]
    ref = mixture_prefix_attention(q64, k64, v64, pk64, pv64, case.lengths, w64, impl="reference")
    ref_grads = torch.autograd.grad(ref, wide, grad_out.double())
    assert_matches(out, ref.detach(), TOLERANCE[torch.float32], "out")
    for name, g, r in zip(("dpacked", "dprompt_k", "dprompt_v", "dweights"), grads, ref_grads):
        assert_matches(g, r, TOLERANCE[torch.float32], name)


def test_oracle_matches_sdpa_per_candidate():
    """The float64 reference loop agrees with an independent per-candidate torch SDPA loop."""
    case = Case(2, 3, 23, 16, IRREGULAR, True)
    tensors, _ = make_inputs(case, torch.float64, "cpu", seed=11)
    q, k, v, pk, pv, w = (t.detach() for t in tensors)
    expected = torch.zeros_like(q)
    offset = 0
    for c, n in enumerate(case.lengths):
        keys = torch.cat([k, pk[:, offset:offset + n].expand(case.batch, -1, -1, -1)], dim=2)
        values = torch.cat([v, pv[:, offset:offset + n].expand(case.batch, -1, -1, -1)], dim=2)
        mask = torch.cat([torch.ones(case.n, case.n, dtype=torch.bool).tril(),
                          torch.ones(case.n, n, dtype=torch.bool)], dim=1)
        expected += w[c] * torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        offset += n
    actual = mixture_prefix_attention(q, k, v, pk, pv, case.lengths, w, causal=True, impl="reference")
    assert_matches(actual, expected, 1e-12, "reference vs sdpa loop")


@pytest.mark.parametrize("case", [CASES[3], CASES[12], EDGE_CASES[1], EDGE_CASES[4]], ids=str)
def test_design_backward_formulas_equal_autograd(case):
    """DESIGN section 2's backward maths (which the fused backward implements) equals autograd."""
    tensors, grad_out = make_inputs(case, torch.float64, "cpu", seed=17)
    expected = float64_oracle(tensors, grad_out, case)
    for name, a, e in zip(NAMES[1:], design_backward64(tensors, grad_out, case, expected[0]), expected[1:]):
        assert_matches(a, e, 1e-10, f"design/{name}")


def test_eager_gradcheck_float64():
    case = Case(2, 2, 5, 4, (0, 2, 1), True)
    tensors, _ = make_inputs(case, torch.float64, "cpu", seed=5)
    tensors[-1] = tensors[-1].detach().double().requires_grad_()

    def fn(q, k, v, pk, pv, w):
        return mixture_prefix_attention(q, k, v, pk, pv, case.lengths, w, causal=True, impl="eager")

    assert torch.autograd.gradcheck(fn, tuple(tensors))


def test_auto_picks_eager_on_cpu():
    from fastdpl.ops import resolve_impl

    assert resolve_impl("auto", torch.device("cpu")) == "eager"


@needs_triton
def test_triton_is_deterministic():
    """Two runs give bitwise-identical outputs and gradients (no float atomics)."""
    case = Case(3, 2, 97, 32, FULL, True)
    tensors, grad_out = make_inputs(case, torch.float32, TRITON_DEVICE, seed=13)
    first = run_with_grads(tensors, grad_out, case, "triton")
    second = run_with_grads(tensors, grad_out, case, "triton")
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between runs"


@needs_triton
def test_backward_launches_rerun_safely_and_prompt_grads_ignore_the_tile_table(monkeypatch):
    """Each backward launch may run twice (benchmark warm-up, autotuning) without accumulating
    twice; and other tiles for the dK/dV and dQ kernels leave the prompt gradients' bits alone
    (their reduction order is fixed by the prompt kernel's own tiling)."""
    from fastdpl.kernels import mixture_attention as launcher

    case = Case(3, 2, 45, 32, FULL, True)
    tensors, grad_out = make_inputs(case, torch.float32, TRITON_DEVICE, seed=21)
    q, k, v, pk, pv, w = (t.detach() for t in tensors)
    (_, out_x, row_max, row_sum, denominators), forward = launcher.forward_launches(q, k, v, pk, pv, case.lengths,
                                                                                   w, True)
    for launch in forward:
        launch()

    def backward(repeat=1):
        finish, launches = launcher.backward_launches(grad_out, q, k, v, pk, pv, case.lengths, w, out_x, row_max,
                                                      row_sum, denominators, True)
        for launch in launches:
            for _ in range(repeat):
                launch()
        return finish()

    once = backward()
    for name, a, b in zip(NAMES[1:], once, backward(repeat=2)):
        assert torch.equal(a, b), f"{name} changed when each launch ran twice"
    expected = float64_oracle(tensors, grad_out, case)
    monkeypatch.setenv("FASTDPL_TILES", "kv=16x16w4s1,q=16x16w4s1")
    other = backward()
    for name, a, b, e in zip(NAMES[1:], other, once, expected[1:]):
        if name in ("dprompt_k", "dprompt_v"):
            assert torch.equal(a, b), f"{name} depends on the dK/dV or dQ tiles"
        assert_matches(a, e, TOLERANCE[torch.float32], f"other tiles/{name}")
