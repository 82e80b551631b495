"""The op's language-model features in every engine, against an oracle written here.

Grouped-query attention (q with H heads, k/v and prompts with H_kv), a ``scale``, fewer queries
than keys (the last N of N_k positions, causal with that offset: decoding after a cache) and
padded batches (``key_mask``, fully hidden rows defined as zeros). The oracle below is written
against torch alone: it expands the key/value heads with ``repeat_interleave`` (transformers'
``repeat_kv`` order), builds each candidate's visibility by hand and runs a float64 softmax per
candidate; it is itself checked against torch's SDPA. Inputs are fresh random draws per case.
"""
import functools
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from fastdpl.ops import mixture_prefix_attention
from helpers import (EAGER_MULTIPLE, NAMES, TOLERANCE, TRITON_DEVICE, UNIT_ROUNDOFF, assert_matches,
                     normalised_error, poisoned_allocations)

needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton needs CUDA or TRITON_INTERPRET=1")


@dataclass(frozen=True)
class LMCase:
    batch: int
    heads: int
    kv_heads: int
    n: int
    n_keys: int
    head_dim: int
    lengths: tuple
    causal: bool = True
    scale: float | None = None
    padding: str = ""  # "right", "left", or "" (no key mask)

    def __str__(self):
        lengths = "-".join(map(str, self.lengths))
        extra = "".join([("c" if self.causal else ""), (f"s{self.scale:g}" if self.scale else ""),
                         (self.padding[:1] if self.padding else "")])
        return f"B{self.batch}H{self.heads}/{self.kv_heads}N{self.n}/{self.n_keys}D{self.head_dim}L{lengths}{extra}"


def key_mask_for(case: LMCase, device="cpu"):
    """Real lengths n_keys, n_keys - 5, ... per sequence; with 3+ sequences the last has no real key,
    so that its rows (and, left-padded and causal, the first rows of the others) see no original key."""
    if not case.padding:
        return None
    mask = torch.zeros(case.batch, case.n_keys, dtype=torch.bool)
    for b in range(case.batch if case.batch < 3 else case.batch - 1):
        mask[b, :max(case.n_keys - 5 * b, 1)] = True
    return (mask.flip(-1) if case.padding == "left" else mask).to(device)


def make_inputs(case: LMCase, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_()

    p = sum(case.lengths)
    weights_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weights = torch.softmax(torch.randn(len(case.lengths), generator=gen, dtype=torch.float64), 0)
    tensors = [randn(case.batch, case.heads, case.n, case.head_dim),
               randn(case.batch, case.kv_heads, case.n_keys, case.head_dim),
               randn(case.batch, case.kv_heads, case.n_keys, case.head_dim),
               randn(case.kv_heads, p, case.head_dim), randn(case.kv_heads, p, case.head_dim),
               weights.to(weights_dtype).to(device).requires_grad_()]
    grad_out = torch.randn(case.batch, case.heads, case.n, case.head_dim, generator=gen, dtype=torch.float64)
    return tensors, grad_out.to(dtype).to(device)


# ---- the oracle ----------------------------------------------------------------------------------
def visibility(case: LMCase, n_prompt: int, key_mask):
    """(B, 1, N, N_k + n_prompt) bool for one candidate: query i (position i + N_k - N) sees key j
    unless j is later (causal) or padding; it sees every prompt key."""
    positions = torch.arange(case.n) + case.n_keys - case.n
    seen = torch.ones(case.batch, 1, case.n, case.n_keys, dtype=torch.bool)
    if case.causal:
        seen &= torch.arange(case.n_keys)[None, :] <= positions[:, None]
    if key_mask is not None:
        seen &= key_mask.cpu()[:, None, None, :]
    return torch.cat([seen, torch.ones(case.batch, 1, case.n, n_prompt, dtype=torch.bool)], dim=-1)


def oracle(case: LMCase, q, k, v, pk, pv, weights, key_mask):
    """sum_c w_c softmax(scale q [k; pk_c]^T) [v; pv_c] in float64; a row that sees nothing gets 0
    (the softmax runs on zeroed scores there, so that autograd stays finite)."""
    group = case.heads // case.kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    pk, pv = pk.repeat_interleave(group, 0), pv.repeat_interleave(group, 0)
    scale = case.head_dim ** -0.5 if case.scale is None else case.scale
    out, start = 0, 0
    for c, n in enumerate(case.lengths):
        keys = torch.cat([k, pk[None, :, start:start + n].expand(case.batch, -1, -1, -1)], dim=2)
        values = torch.cat([v, pv[None, :, start:start + n].expand(case.batch, -1, -1, -1)], dim=2)
        seen = visibility(case, n, key_mask)
        any_seen = seen.any(-1, keepdim=True)
        scores = (q @ keys.transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))
        probs = torch.softmax(scores.masked_fill(~any_seen, 0.0), -1) * any_seen
        out = out + weights[c] * (probs @ values)
        start += n
    return out


def oracle64(case, tensors, grad_out):
    wide = [t.detach().cpu().double().requires_grad_() for t in tensors]
    out = oracle(case, *wide, key_mask_for(case))
    return [out.detach(), *torch.autograd.grad(out, wide, grad_out.cpu().double(), allow_unused=True,
                                               materialize_grads=True)]


def run(case, tensors, grad_out, impl, key_mask="case"):
    q, k, v, pk, pv, w = tensors
    key_mask = key_mask_for(case, q.device) if isinstance(key_mask, str) else key_mask
    out = mixture_prefix_attention(q, k, v, pk, pv, case.lengths, w, case.causal, impl, scale=case.scale,
                                   key_mask=key_mask)
    return [out.detach(), *torch.autograd.grad(out, tensors, grad_out, allow_unused=True, materialize_grads=True)]


def _seed(case, *parts):
    return zlib.crc32(repr((str(case), *parts)).encode())


def test_oracle_matches_sdpa_per_candidate_on_rows_that_see_a_key():
    case = LMCase(3, 6, 2, 9, 21, 16, (0, 3, 5), scale=0.2, padding="left")
    tensors, _ = make_inputs(case, torch.float64, "cpu", seed=3)
    q, k, v, pk, pv, _ = (t.detach() for t in tensors)
    key_mask, group = key_mask_for(case), case.heads // case.kv_heads
    for c, n in enumerate(case.lengths):
        one_hot = torch.zeros(len(case.lengths), dtype=torch.float64)
        one_hot[c] = 1.0
        start = sum(case.lengths[:c])
        keys = torch.cat([k, pk[None, :, start:start + n].expand(case.batch, -1, -1, -1)], dim=2)
        values = torch.cat([v, pv[None, :, start:start + n].expand(case.batch, -1, -1, -1)], dim=2)
        seen = visibility(case, n, key_mask)
        expected = F.scaled_dot_product_attention(q, keys.repeat_interleave(group, 1),
                                                  values.repeat_interleave(group, 1), attn_mask=seen,
                                                  scale=case.scale)
        actual = oracle(case, q, k, v, pk, pv, one_hot, key_mask)
        rows = seen.any(-1).expand(-1, case.heads, -1)  # SDPA leaves rows that see nothing undefined
        assert rows.sum() < rows.numel() or n > 0
        torch.testing.assert_close(actual[rows], expected[rows], rtol=1e-12, atol=1e-12)
        assert torch.equal(actual[~rows], torch.zeros_like(actual[~rows]))


def test_oracle_group_order_is_transformers_repeat_kv():
    """Query head h reads key/value head h // group: repeat_interleave over heads, as
    transformers' repeat_kv builds it ((B, H_kv, 1, N, D) expanded to G, then reshaped)."""
    kv = torch.randn(2, 3, 5, 4)
    repeated = kv[:, :, None].expand(2, 3, 4, 5, 4).reshape(2, 12, 5, 4)
    assert torch.equal(kv.repeat_interleave(4, 1), repeated)


# ---- every engine against it ---------------------------------------------------------------------
CASES = [
    LMCase(2, 6, 2, 13, 13, 24, (0, 3, 0, 9), scale=0.3),
    LMCase(2, 4, 1, 1, 37, 40, (0, 4, 8)),                      # one decoding step, multi-query
    LMCase(2, 6, 3, 13, 50, 64, (0, 4, 8, 16)),                 # 13 queries after 37 cached keys
    LMCase(3, 3, 3, 33, 33, 24, (5,), padding="right"),         # one prompted candidate
    LMCase(3, 4, 2, 21, 21, 40, (0,), padding="left"),          # no prompts: rows that see nothing are 0
    LMCase(3, 4, 2, 19, 30, 16, (0, 2, 6), padding="left"),     # left padding + a cache offset
    LMCase(2, 6, 2, 17, 17, 64, (0, 4, 8), causal=False, scale=1 / 64, padding="right"),
    LMCase(2, 4, 2, 7, 29, 24, (0, 3), causal=False),           # cross-attention shape, N < N_k
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", ["reference", "eager"])
def test_torch_engines_match_oracle(impl, case, dtype):
    tensors, grad_out = make_inputs(case, dtype, "cpu", _seed(case, impl, dtype))
    expected = oracle64(case, tensors, grad_out)
    for name, a, e in zip(NAMES, run(case, tensors, grad_out, impl), expected):
        assert_matches(a, e, TOLERANCE[dtype], f"{impl}/{dtype}/{case}/{name}")


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_oracle_float32(case):
    tensors, grad_out = make_inputs(case, torch.float32, TRITON_DEVICE, _seed(case, "triton"))
    expected = oracle64(case, tensors, grad_out)
    with poisoned_allocations():
        actual = run(case, tensors, grad_out, "triton")
    for name, a, e in zip(NAMES, actual, expected):
        assert_matches(a, e, TOLERANCE[torch.float32], f"triton/{case}/{name}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]], ids=str)
def test_triton_low_precision_by_flash_attentions_rule(case, dtype):
    """At most twice the eager engine's error in the same dtype plus one rounding to it."""
    tensors, grad_out = make_inputs(case, dtype, TRITON_DEVICE, _seed(case, "triton", dtype))
    expected = oracle64(case, tensors, grad_out)
    eager = run(case, tensors, grad_out, "eager")
    with poisoned_allocations():
        actual = run(case, tensors, grad_out, "triton")
    for name, a, b, e in zip(NAMES, actual, eager, expected):
        assert_matches(a, e, EAGER_MULTIPLE * normalised_error(b, e) + UNIT_ROUNDOFF[dtype], f"{dtype}/{case}/{name}")


@pytest.mark.parametrize("impl", ["reference", "eager", pytest.param("triton", marks=needs_triton)])
def test_padding_keys_get_no_gradient_and_blind_rows_are_zero(impl):
    """A padding key has exactly zero dk and dv; with no prompts, a row that sees no key is exactly
    zero and so is its dq; every value is finite (no 0/0 anywhere)."""
    case = LMCase(3, 4, 2, 21, 21, 16, (0,), padding="left")
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    tensors, grad_out = make_inputs(case, torch.float32, device, seed=5)
    out, dq, dk, dv, *_ = run(case, tensors, grad_out, impl)
    key_mask = key_mask_for(case, device)
    padding = ~key_mask[:, None, :, None].expand_as(dk)
    assert torch.equal(dk[padding], torch.zeros_like(dk[padding]))
    assert torch.equal(dv[padding], torch.zeros_like(dv[padding]))
    blind = ~visibility(case, 0, key_mask.cpu()).any(-1).expand(-1, case.heads, -1).to(device)  # (B, H, N)
    assert blind[-1].all() and blind[1, :, :5].all() and not blind[1, :, 5:].any() and not blind[0].any()
    assert torch.equal(out[blind], torch.zeros_like(out[blind]))
    assert torch.equal(dq[blind], torch.zeros_like(dq[blind]))


@needs_triton
def test_triton_grouped_query_attention_is_deterministic():
    case = LMCase(2, 4, 2, 21, 30, 16, (0, 4, 8), padding="right")
    tensors, grad_out = make_inputs(case, torch.float32, TRITON_DEVICE, seed=8)
    first, second = run(case, tensors, grad_out, "triton"), run(case, tensors, grad_out, "triton")
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two runs"


@pytest.mark.parametrize("impl", ["reference", "eager", pytest.param("triton", marks=needs_triton)])
def test_a_sequence_with_no_real_key_attends_to_the_prompts_alone(impl):
    """Every key of the last sequence is padding: its rows are sum_{n_c > 0} w_c softmax(q pk_c^T) pv_c,
    written out here without the oracle; zero-length candidates add exactly nothing."""
    case = LMCase(3, 4, 2, 6, 6, 16, (0, 3, 0, 4), causal=False, padding="right")
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    tensors, grad_out = make_inputs(case, torch.float32, device, seed=9)
    actual = run(case, tensors, grad_out, impl)
    assert all(torch.isfinite(a).all() for a in actual)
    q, _, _, pk, pv, w = (t.detach().cpu().double() for t in tensors)
    pk, pv = pk.repeat_interleave(2, 0), pv.repeat_interleave(2, 0)
    expected, start = torch.zeros_like(q[-1]), 0
    for c, n in enumerate(case.lengths):
        if n:
            scores = q[-1] @ pk[:, start:start + n].transpose(-1, -2) * case.head_dim ** -0.5
            expected += w[c] * torch.softmax(scores, -1) @ pv[:, start:start + n]
        start += n
    assert_matches(actual[0][-1], expected, TOLERANCE[torch.float32], f"{impl}/no-key sequence")


@needs_triton
def test_triton_decoding_gives_the_last_rows_of_full_causal_attention():
    """Queries = the last N of N_k keys (a step after a cache) equal those rows of the N_k x N_k call."""
    case = LMCase(2, 4, 2, 40, 40, 16, (0, 3, 5), scale=0.3, padding="left")
    tensors, _ = make_inputs(case, torch.float32, TRITON_DEVICE, seed=6)
    q, k, v, pk, pv, w = (t.detach() for t in tensors)
    mask = key_mask_for(case, TRITON_DEVICE)
    call = functools.partial(mixture_prefix_attention, candidate_lengths=case.lengths, weights=w, causal=True,
                             impl="triton", scale=0.3, key_mask=mask)
    whole = call(q, k, v, pk, pv)
    for n in (1, 7):
        assert_matches(call(q[:, :, -n:], k, v, pk, pv), whole[:, :, -n:], TOLERANCE[torch.float32], f"last {n}")


@needs_triton
def test_triton_reads_strided_key_masks():
    """A broadcast (stride 0) mask and a strided view give exactly what their contiguous copies give."""
    case = LMCase(2, 4, 2, 9, 24, 16, (0, 4))
    tensors, grad_out = make_inputs(case, torch.float32, TRITON_DEVICE, seed=8)
    row = torch.arange(24, device=TRITON_DEVICE) % 3 != 1
    wide = torch.stack([row, ~row], 0).repeat_interleave(2, 1)
    for view in (row[None].expand(2, -1), wide[:, ::2]):
        assert not view.is_contiguous()
        got, want = (run(case, tensors, grad_out, "triton", key_mask=m)
                     for m in (view, view.contiguous()))
        for name, a, b in zip(NAMES, got, want):
            assert torch.equal(a, b), f"{name} depends on the key_mask's strides"


# ---- the registered op and torch.compile ---------------------------------------------------------
@needs_triton
def test_opcheck_with_grouped_heads_a_cache_offset_and_a_key_mask():
    case = LMCase(3, 4, 2, 11, 19, 16, (0, 3, 2), padding="left")
    tensors, grad_out = make_inputs(case, torch.float32, TRITON_DEVICE, seed=2)
    q, k, v, pk, pv, w = tensors
    key_mask = key_mask_for(case, TRITON_DEVICE)
    fwd_args = (q, k, v, pk, pv, list(case.lengths), w, True, 0.27, key_mask)
    torch.library.opcheck(torch.ops.fastdpl.mixture_attention_fwd.default, fwd_args)
    with torch.no_grad():
        _, out_x, row_max, row_sum, denominators = torch.ops.fastdpl.mixture_attention_fwd(*fwd_args)
    bwd_args = (grad_out, *(t.detach() for t in (q, k, v, pk, pv)), list(case.lengths), w.detach(),
                out_x, row_max, row_sum, denominators, True, 0.27, key_mask)
    torch.library.opcheck(torch.ops.fastdpl.mixture_attention_bwd.default, bwd_args)


def _compiled_matches_uncompiled(impl, device, backend="inductor"):
    """torch.compile(fullgraph=True, dynamic=True) around the op at two shapes: same output and grads."""

    def layer(q, k, v, pk, pv, arch_logits, key_mask, lengths):
        out = mixture_prefix_attention(q, k, v, pk, pv, lengths, torch.softmax(arch_logits, 0), causal=True,
                                       impl=impl, scale=0.3, key_mask=key_mask)
        return out * 2.0

    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=backend)
    for case in (LMCase(3, 4, 2, 9, 23, 16, (0, 1, 4), padding="left"),
                 LMCase(3, 4, 2, 14, 31, 16, (0, 1, 4), padding="left")):
        tensors, grad_out = make_inputs(case, torch.float32, device, seed=case.n)
        q, k, v, pk, pv, w = tensors
        leaves = (q, k, v, pk, pv, torch.log(w.detach()).requires_grad_())
        key_mask = key_mask_for(case, device)
        expected = layer(*leaves, key_mask, case.lengths)
        actual = compiled(*leaves, key_mask, case.lengths)
        assert_matches(actual, expected.detach(), TOLERANCE[torch.float32], f"compiled {impl} out {case}")
        for i, (a, e) in enumerate(zip(torch.autograd.grad(actual, leaves, grad_out),
                                       torch.autograd.grad(expected, leaves, grad_out))):
            assert_matches(a, e, TOLERANCE[torch.float32], f"compiled {impl} grad {i} {case}")


@pytest.mark.slow
def test_compile_fullgraph_eager_engine_with_language_model_inputs():
    """Traced whole with dynamic shapes (aot_eager: inductor's lowering of the eager engine is
    tested in test_op_api, and costs ~25 s more here)."""
    _compiled_matches_uncompiled("eager", "cpu", backend="aot_eager")


@needs_triton
@pytest.mark.slow
def test_compile_fullgraph_triton_with_language_model_inputs():
    _compiled_matches_uncompiled("triton", TRITON_DEVICE)


# ---- bad input ----------------------------------------------------------------------------------
def _good():
    case = LMCase(2, 4, 2, 5, 9, 16, (0, 2))
    tensors, _ = make_inputs(case, torch.float32, "cpu", seed=1)
    return [t.detach() for t in tensors]


def _call(q, k, v, pk, pv, w, causal=True, **kwargs):
    return mixture_prefix_attention(q, k, v, pk, pv, (0, 2), w, causal, "eager", **kwargs)


BAD = [
    ("heads", ValueError, lambda t: _call(t[0], torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16), *t[3:])),
    ("v must have k's shape", ValueError, lambda t: _call(t[0], t[1], torch.randn(2, 2, 8, 16), *t[3:])),
    ("k must have shape", ValueError, lambda t: _call(t[0], torch.randn(3, 2, 9, 16), t[2], *t[3:])),
    ("prompt_k must have shape \\(H_kv", ValueError, lambda t: _call(*t[:3], torch.randn(4, 2, 16), *t[4:])),
    ("causal=True needs at most as many queries as keys", ValueError,
     lambda t: _call(torch.randn(2, 4, 10, 16), *t[1:])),
    ("key_mask must be a bool tensor", TypeError, lambda t: _call(*t, key_mask=torch.ones(2, 9))),
    ("key_mask must have shape \\(B, N_k\\)", ValueError,
     lambda t: _call(*t, key_mask=torch.ones(2, 5, dtype=torch.bool))),
    ("key_mask must be on q's device", ValueError,
     lambda t: _call(*t, key_mask=torch.ones(2, 9, dtype=torch.bool, device="meta"))),
    ("scale must be a finite positive number", ValueError, lambda t: _call(*t, scale=0.0)),
    ("scale must be a finite positive number", ValueError, lambda t: _call(*t, scale=float("nan"))),
    ("scale must be a finite positive number", ValueError, lambda t: _call(*t, scale="0.1")),
    ("scale must be a finite positive number", ValueError, lambda t: _call(*t, scale=float("-inf"))),
    ("scale must be a finite positive number", (TypeError, ValueError), lambda t: _call(*t, scale=True)),
    ("key_mask must be a bool tensor", TypeError,
     lambda t: _call(*t, key_mask=torch.ones(2, 9, dtype=torch.uint8))),
    ("key_mask must have shape \\(B, N_k\\)", ValueError,
     lambda t: _call(*t, key_mask=torch.ones(2, 1, 1, 9, dtype=torch.bool))),
]


@pytest.mark.parametrize("match,error,call", BAD, ids=[f"{i}-{m[:20]}" for i, (m, _, _) in enumerate(BAD)])
def test_bad_language_model_inputs_are_named(match, error, call):
    with pytest.raises(error, match=match):
        call(_good())


def test_non_causal_allows_more_queries_than_keys():
    t = _good()
    out = _call(torch.randn(2, 4, 12, 16), *t[1:], causal=False)
    assert out.shape == (2, 4, 12, 16)


def test_an_integer_scale_is_the_same_real_number():
    t = _good()
    assert torch.equal(_call(*t, scale=1), _call(*t, scale=1.0))
