"""mixture_prefix_attention for language models: GQA, scale, N < N_k, key_mask.

Every engine (reference, eager, triton) is checked, outputs and all six gradients, against a
float64 oracle written here from the spec alone: it expands the key/value heads with
``repeat_interleave`` (checked equal to transformers' ``repeat_kv``), builds each candidate's
visibility by hand (offset-causal and key_mask on the original keys, prompts always visible) and
runs an exp/normalise softmax that is NaN-free by construction, so that rows which see no key
are exactly zero with finite gradients. The oracle itself is verified against torch's SDPA.
"""
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from fastdpl.ops import mixture_prefix_attention
from helpers import (EAGER_MULTIPLE, NAMES, TOLERANCE, TRITON_DEVICE, UNIT_ROUNDOFF, assert_matches,
                     normalised_error, poisoned_allocations)

needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton needs CUDA or TRITON_INTERPRET=1")


# ---- cases and inputs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LM:
    """One call's shapes. ``real``: real keys per sequence (None: no key_mask); ``side``: where
    the padding goes ("right", "left", or "random": a scattered pattern with that many real keys)."""
    batch: int
    heads: int
    kv_heads: int
    n: int
    n_keys: int
    head_dim: int
    lengths: tuple
    causal: bool = True
    scale: float = None
    real: tuple = None
    side: str = "right"

    def __str__(self):
        mask = "" if self.real is None else f"-{self.side[0]}{'.'.join(map(str, self.real))}"
        return (f"B{self.batch}H{self.heads}o{self.kv_heads}N{self.n}o{self.n_keys}D{self.head_dim}"
                f"L{'.'.join(map(str, self.lengths))}{'c' if self.causal else ''}"
                f"{'' if self.scale is None else f's{self.scale:.3g}'}{mask}")


def seed_of(*parts):
    """A fixed per-case seed (hash() of strings changes between runs)."""
    return zlib.crc32(repr(parts).encode())


def key_mask_of(case: LM, device="cpu"):
    """(B, N_k) bool with case.real[b] real keys in sequence b, placed by case.side."""
    if case.real is None:
        return None
    gen = torch.Generator().manual_seed(seed_of("mask", str(case)))
    mask = torch.zeros(case.batch, case.n_keys, dtype=torch.bool)
    for b, r in enumerate(case.real):
        if case.side == "right":
            mask[b, :r] = True
        elif case.side == "left":
            mask[b, case.n_keys - r:] = True
        else:
            mask[b, torch.randperm(case.n_keys, generator=gen)[:r]] = True
    return mask.to(device)


def make_inputs(case: LM, dtype, device, seed):
    """Leaf q (B,H,N,D), k, v (B,H_kv,N_k,D), prompts (H_kv,P,D), softmax weights (C,), and dO."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    p = sum(case.lengths)
    w_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weights = torch.softmax(torch.randn(len(case.lengths), generator=gen, dtype=torch.float64), 0)
    tensors = [randn(case.batch, case.heads, case.n, case.head_dim),
               randn(case.batch, case.kv_heads, case.n_keys, case.head_dim),
               randn(case.batch, case.kv_heads, case.n_keys, case.head_dim),
               randn(case.kv_heads, p, case.head_dim), randn(case.kv_heads, p, case.head_dim),
               weights.to(w_dtype).to(device)]
    return [t.requires_grad_() for t in tensors], randn(case.batch, case.heads, case.n, case.head_dim)


# ---- the independent float64 oracle --------------------------------------------------------------
def repeat_kv(x, n_rep):
    """transformers' repeat_kv, verbatim in effect: (B, H_kv, S, D) -> (B, H_kv * n_rep, S, D)."""
    b, h_kv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h_kv, n_rep, s, d).reshape(b, h_kv * n_rep, s, d)


def visible_originals(case: LM, key_mask):
    """(B, 1, N, N_k) bool: query i sits at position i + N_k - N; it sees key j unless j is after
    it (causal) or padding."""
    position = torch.arange(case.n)[:, None] + (case.n_keys - case.n)
    seen = torch.ones(case.batch, 1, case.n, case.n_keys, dtype=torch.bool)
    if case.causal:
        seen = seen & (torch.arange(case.n_keys)[None, :] <= position)
    if key_mask is not None:
        seen = seen & key_mask.cpu()[:, None, None, :]
    return seen


def candidate_keys(case: LM, k, v, pk, pv, c):
    """Candidate c's keys/values [k ; pk_c] expanded to H query heads, and its (B,1,N,N_k+n_c) mask."""
    group, start, n_c = case.heads // case.kv_heads, sum(case.lengths[:c]), case.lengths[c]
    pk_c = pk[None, :, start:start + n_c].expand(case.batch, -1, -1, -1)
    pv_c = pv[None, :, start:start + n_c].expand(case.batch, -1, -1, -1)
    keys = torch.repeat_interleave(torch.cat([k, pk_c], 2), group, dim=1)
    values = torch.repeat_interleave(torch.cat([v, pv_c], 2), group, dim=1)
    return keys, values


def candidate_mask(case: LM, c, key_mask):
    prompts = torch.ones(case.batch, 1, case.n, case.lengths[c], dtype=torch.bool)
    return torch.cat([visible_originals(case, key_mask), prompts], -1)


def safe_attention(q, keys, values, seen, scale):
    """softmax over the seen keys by hand: exp(s - m) * seen / Z, with hidden scores replaced by m
    (never -inf) and Z = 0 replaced by 1, so that blind rows are exactly 0 with finite gradients."""
    s = (q @ keys.transpose(-1, -2)) * scale
    m = torch.where(seen, s, float("-inf")).amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(torch.where(seen, s, m) - m) * seen
    z = e.sum(-1, keepdim=True)
    return (e / torch.where(z > 0, z, torch.ones_like(z))) @ values


def oracle(case: LM, q, k, v, pk, pv, w, key_mask):
    """sum_c w_c * attention over [k; pk_c], in the inputs' dtype (float64 here)."""
    scale = case.head_dim ** -0.5 if case.scale is None else case.scale
    out = torch.zeros_like(q)
    for c in range(len(case.lengths)):
        keys, values = candidate_keys(case, k, v, pk, pv, c)
        out = out + w[c] * safe_attention(q, keys, values, candidate_mask(case, c, key_mask), scale)
    return out


def oracle64(case, tensors, grad_out):
    """Oracle output and autograd gradients of q, k, v, prompt_k, prompt_v, weights in float64."""
    wide = [t.detach().cpu().double().requires_grad_() for t in tensors]
    out = oracle(case, *wide, key_mask_of(case))
    grads = torch.autograd.grad(out, wide, grad_out.cpu().double(), allow_unused=True, materialize_grads=True)
    return [out.detach(), *grads]


def run(case, tensors, grad_out, impl, key_mask="case"):
    """An engine's output and six gradients (key_mask: the case's, unless one is passed)."""
    q, k, v, pk, pv, w = tensors
    mask = key_mask_of(case, q.device) if isinstance(key_mask, str) else key_mask
    out = mixture_prefix_attention(q, k, v, pk, pv, case.lengths, w, case.causal, impl, scale=case.scale,
                                   key_mask=mask)
    grads = torch.autograd.grad(out, tensors, grad_out, allow_unused=True, materialize_grads=True)
    return [out.detach(), *grads]


def assert_padding_gets_no_gradient(case, dk, dv):
    """dk and dv rows of keys that key_mask hides are exactly zero."""
    mask = key_mask_of(case)
    if mask is None:
        return
    hidden = ~mask[:, None, :].expand(-1, case.kv_heads, -1)
    for name, g in (("dk", dk), ("dv", dv)):
        rows = g.detach().cpu()[hidden]
        assert torch.equal(rows, torch.zeros_like(rows)), f"{name}: padding keys got a gradient"


def check_engine(case, impl, dtype, device, tol=None):
    tensors, grad_out = make_inputs(case, dtype, device, seed_of(str(case), impl, str(dtype)))
    expected = oracle64(case, tensors, grad_out)
    if impl == "triton":
        with poisoned_allocations():
            actual = run(case, tensors, grad_out, impl)
    else:
        actual = run(case, tensors, grad_out, impl)
    if tol is None:
        tol = [TOLERANCE[dtype]] * len(NAMES)
    for name, a, e, t in zip(NAMES, actual, expected, tol):
        assert a.dtype == (e.dtype if dtype == torch.float64 else (torch.float32 if name == "dweights" else dtype))
        assert_matches(a, e, t, f"{impl}/{dtype}/{case}/{name}")
    assert_padding_gets_no_gradient(case, actual[2], actual[3])
    return tensors, grad_out, expected, actual


# ---- the oracle's own checks ---------------------------------------------------------------------
def test_repeat_interleave_is_transformers_repeat_kv_order():
    """Query head h reads key/value head h // G under both spellings."""
    kv = torch.randn(2, 3, 5, 4)
    expanded = torch.repeat_interleave(kv, 4, dim=1)
    assert torch.equal(expanded, repeat_kv(kv, 4))
    for h in range(12):
        assert torch.equal(expanded[:, h], kv[:, h // 4])


@pytest.mark.parametrize("case", [
    LM(3, 6, 2, 9, 21, 16, (0, 3, 5), scale=0.3, real=(21, 12, 0), side="left"),
    LM(3, 4, 1, 25, 11, 8, (2, 0), causal=False, real=(11, 4, 0), side="random"),
], ids=str)
def test_oracle_matches_sdpa_per_candidate(case):
    """Each candidate of the oracle equals SDPA (bool attn_mask, scale) on rows that see a key;
    rows that see none are exactly zero, and the oracle's gradients are finite there."""
    tensors, grad_out = make_inputs(case, torch.float64, "cpu", seed=3)
    q, k, v, pk, pv, _ = (t.detach() for t in tensors)
    key_mask = key_mask_of(case)
    blind_seen = False
    for c in range(len(case.lengths)):
        one_hot = F.one_hot(torch.tensor(c), len(case.lengths)).double()
        keys, values = candidate_keys(case, k, v, pk, pv, c)
        seen = candidate_mask(case, c, key_mask)
        expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=seen, scale=case.scale)
        actual = oracle(case, q, k, v, pk, pv, one_hot, key_mask)
        rows = seen.any(-1).expand(-1, case.heads, -1)
        blind_seen |= bool((~rows).any())
        torch.testing.assert_close(actual[rows], expected[rows], rtol=1e-12, atol=1e-12)
        assert torch.equal(actual[~rows], torch.zeros_like(actual[~rows]))
    assert blind_seen, "the case should hold rows that see no key"
    for g in oracle64(case, tensors, grad_out):
        assert torch.isfinite(g).all()


# ---- every engine against the oracle -------------------------------------------------------------
# Small enough for Triton's interpreter (N, N_k <= 70, B * H small).
CASES = [
    LM(2, 6, 2, 13, 50, 24, (0, 3, 0, 9), scale=0.3, real=(50, 31)),             # 13 queries after a cache
    LM(3, 4, 1, 1, 37, 40, (0, 3, 0, 9), real=(37, 20, 0), side="left"),          # one decoding step, MQA
    LM(3, 3, 3, 33, 33, 64, (5,), scale=1 / 64, real=(33, 17, 0), side="left"),   # left pad + causal
    LM(3, 6, 2, 33, 33, 24, (0,), real=(30, 9, 0), side="left"),                   # no prompts: blind rows
    LM(2, 4, 1, 13, 50, 64, (0, 3, 0, 9), causal=False, real=(23, 0), side="random"),
    LM(2, 3, 3, 33, 33, 40, (0, 3, 0, 9)),                                         # plain causal LM
    LM(1, 2, 1, 45, 70, 24, (0, 2, 6), scale=0.3),                                 # several key tiles, offset
    LM(2, 4, 2, 20, 7, 40, (0, 2), causal=False, real=(7, 0)),                     # non-causal N > N_k
]
HALF_CASES = [CASES[0], CASES[2]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", ["reference", "eager"])
def test_torch_engines_match_oracle(impl, case, dtype):
    check_engine(case, impl, dtype, "cpu")


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_oracle_float32(case):
    check_engine(case, "triton", torch.float32, TRITON_DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", HALF_CASES, ids=str)
def test_triton_low_precision_within_flash_attention_rule(case, dtype):
    """At most EAGER_MULTIPLE x eager's error in the same dtype plus one unit roundoff."""
    tensors, grad_out = make_inputs(case, dtype, TRITON_DEVICE, seed_of(str(case), "half", str(dtype)))
    expected = oracle64(case, tensors, grad_out)
    eager = run(case, tensors, grad_out, "eager")
    with poisoned_allocations():
        actual = run(case, tensors, grad_out, "triton")
    for name, a, b, e in zip(NAMES, actual, eager, expected):
        assert_matches(a, e, EAGER_MULTIPLE * normalised_error(b, e) + UNIT_ROUNDOFF[dtype], f"{dtype}/{name}")
    assert_padding_gets_no_gradient(case, actual[2], actual[3])


# ---- the defined zeros of rows that see no original key -----------------------------------------
@pytest.mark.parametrize("impl", ["reference", "eager", pytest.param("triton", marks=needs_triton)])
def test_all_masked_sequence_attends_to_prompts_only(impl):
    """A sequence with every key masked: out = sum_{n_c > 0} w_c softmax over pk_c (written out
    directly, not via the oracle); zero-length candidates add exactly nothing; all finite."""
    case = LM(2, 4, 2, 6, 6, 16, (0, 3, 0, 4), causal=False, real=(6, 0))
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    tensors, grad_out = make_inputs(case, torch.float32, device, seed=9)
    actual = run(case, tensors, grad_out, impl)
    assert all(torch.isfinite(a).all() for a in actual)
    q, _, _, pk, pv, w = (t.detach().cpu().double() for t in tensors)
    pk, pv = torch.repeat_interleave(pk, 2, 0), torch.repeat_interleave(pv, 2, 0)
    expected = torch.zeros_like(q[1])
    for c, (start, n_c) in enumerate(((0, 0), (0, 3), (3, 0), (3, 4))):
        if n_c:
            scores = q[1] @ pk[:, start:start + n_c].transpose(-1, -2) * case.head_dim ** -0.5
            expected += w[c] * torch.softmax(scores, -1) @ pv[:, start:start + n_c]
    assert_matches(actual[0][1], expected, TOLERANCE[torch.float32], f"{impl}/all-masked row")


@pytest.mark.parametrize("impl", ["reference", "eager", pytest.param("triton", marks=needs_triton)])
def test_blind_rows_are_exact_zeros_without_prompts(impl):
    """Only zero-length candidates, left padding + causal: the pad query rows (and the whole
    all-masked sequence) are exactly 0, their dq is exactly 0, padding keys get no dk/dv."""
    case = LM(3, 4, 2, 19, 19, 16, (0, 0), real=(19, 11, 0), side="left")
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    tensors, grad_out = make_inputs(case, torch.float32, device, seed=4)
    with poisoned_allocations():
        out, dq, dk, dv, dpk, dpv, dw = run(case, tensors, grad_out, impl)
    blind = ~visible_originals(case, key_mask_of(case)).any(-1).expand(-1, case.heads, -1)
    assert blind[2].all() and blind[1, :, :8].all() and not blind[1, :, 8:].any() and not blind[0].any()
    for name, t in (("out", out), ("dq", dq)):
        assert torch.isfinite(t).all(), name
        assert torch.equal(t.cpu()[blind], torch.zeros_like(t.cpu()[blind])), f"{name} not zero on blind rows"
    assert torch.isfinite(dw).all() and dpk.numel() == 0 and dpv.numel() == 0
    assert_padding_gets_no_gradient(case, dk, dv)


# ---- properties the Triton engine must keep with the new arguments ------------------------------
@needs_triton
def test_triton_decoding_equals_the_last_rows_of_full_causal_attention():
    """Queries = the last N of N_k: the same rows as the full N_k x N_k causal call."""
    full = LM(2, 4, 2, 40, 40, 16, (0, 3, 5), scale=0.3, real=(40, 29), side="left")
    tensors, _ = make_inputs(full, torch.float32, TRITON_DEVICE, seed=6)
    q, k, v, pk, pv, w = (t.detach() for t in tensors)
    mask = key_mask_of(full, TRITON_DEVICE)
    whole = mixture_prefix_attention(q, k, v, pk, pv, full.lengths, w, True, "triton", scale=0.3, key_mask=mask)
    for n in (1, 7):
        tail = mixture_prefix_attention(q[:, :, -n:], k, v, pk, pv, full.lengths, w, True, "triton", scale=0.3,
                                        key_mask=mask)
        assert_matches(tail, whole[:, :, -n:], TOLERANCE[torch.float32], f"last {n} rows")


@needs_triton
def test_triton_takes_strided_key_masks():
    """A broadcast (stride-0) mask and a sliced view give the same result as contiguous copies."""
    case = LM(2, 4, 2, 9, 24, 16, (0, 4), real=(24, 24))
    tensors, grad_out = make_inputs(case, torch.float32, TRITON_DEVICE, seed=8)
    row = torch.arange(24, device=TRITON_DEVICE) % 3 != 1
    wide = torch.stack([row, ~row], 0).repeat_interleave(2, 1)  # (2, 48): every other column is a view
    for view in (row[None].expand(2, -1), wide[:, ::2]):
        assert not view.is_contiguous()
        got = run(case, tensors, grad_out, "triton", key_mask=view)
        want = run(case, tensors, grad_out, "triton", key_mask=view.contiguous())
        for name, a, b in zip(NAMES, got, want):
            assert torch.equal(a, b), f"{name} depends on the key_mask's strides"


# ---- the registered op and torch.compile ---------------------------------------------------------
@needs_triton
def test_opcheck_with_gqa_key_mask_and_fewer_queries():
    case = LM(2, 4, 2, 5, 11, 16, (0, 2, 3), real=(11, 6), side="left")
    tensors, grad_out = make_inputs(case, torch.float32, TRITON_DEVICE, seed=2)
    q, k, v, pk, pv, w = tensors
    mask = key_mask_of(case, TRITON_DEVICE)
    fwd = (q, k, v, pk, pv, list(case.lengths), w, True, 0.3, mask)
    torch.library.opcheck(torch.ops.fastdpl.mixture_attention_fwd.default, fwd)
    with torch.no_grad():
        _, *stats = torch.ops.fastdpl.mixture_attention_fwd(*fwd)
    bwd = (grad_out, *(t.detach() for t in (q, k, v, pk, pv)), list(case.lengths), w.detach(), *stats,
           True, 0.3, mask)
    torch.library.opcheck(torch.ops.fastdpl.mixture_attention_bwd.default, bwd)


def _compiled_equals_uncompiled(impl, device, backend):
    """compile(fullgraph, dynamic) of a layer around the op, at two shapes: same output and grads."""

    def layer(q, k, v, pk, pv, logits, key_mask):
        w = torch.softmax(logits, 0)
        return mixture_prefix_attention(q, k, v, pk, pv, (0, 2, 3), w, True, impl, scale=0.3,
                                        key_mask=key_mask).sin()

    from torch._dynamo.utils import counters

    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=backend)
    graphs = counters["stats"]["unique_graphs"]
    # No N, N_k equal to P = 5 or to each other: torch "duck-sizes" equal dims, and P is a constant.
    for case in (LM(2, 4, 2, 7, 13, 16, (0, 2, 3), real=(13, 6), side="left"),
                 LM(3, 4, 2, 10, 19, 16, (0, 2, 3), real=(19, 8, 0), side="right")):
        tensors, grad_out = make_inputs(case, torch.float32, device, seed=case.n)
        leaves = (*tensors[:5], torch.log(tensors[5].detach()).requires_grad_())
        mask = key_mask_of(case, device)
        want, got = layer(*leaves, mask), compiled(*leaves, mask)
        assert_matches(got, want.detach(), TOLERANCE[torch.float32], f"{impl} compiled out {case}")
        for i, (a, b) in enumerate(zip(torch.autograd.grad(got, leaves, grad_out),
                                       torch.autograd.grad(want, leaves, grad_out))):
            assert_matches(a, b, TOLERANCE[torch.float32], f"{impl} compiled grad {i} {case}")
    assert counters["stats"]["unique_graphs"] - graphs == 1, "recompiled for the second shape"


@pytest.mark.slow
def test_compile_eager_engine_with_lm_arguments():
    _compiled_equals_uncompiled("eager", "cpu", "aot_eager")


@needs_triton
@pytest.mark.slow
def test_compile_triton_engine_with_lm_arguments():
    _compiled_equals_uncompiled("triton", TRITON_DEVICE, "aot_eager")


# ---- bad inputs name the argument ----------------------------------------------------------------
def _good():
    """B=2, H=4, H_kv=2, N=5, N_k=9, D=16, lengths (0, 2), detached float32 on the CPU."""
    tensors, _ = make_inputs(LM(2, 4, 2, 5, 9, 16, (0, 2)), torch.float32, "cpu", seed=1)
    return [t.detach() for t in tensors]


def _call(t, causal=True, **kwargs):
    return mixture_prefix_attention(*t[:5], (0, 2), t[5], causal, "eager", **kwargs)


def _swap(t, **by_name):
    order = ("q", "k", "v", "pk", "pv", "w")
    return [by_name.get(name, x) for name, x in zip(order, t)]


BAD = [
    ("k|heads", ValueError, lambda t: _swap(t, k=torch.randn(2, 3, 9, 16), v=torch.randn(2, 3, 9, 16))),
    ("prompt_k", ValueError, lambda t: _swap(t, pk=torch.randn(4, 2, 16))),
    ("prompt_v", ValueError, lambda t: _swap(t, pv=torch.randn(4, 2, 16))),
    ("v", ValueError, lambda t: _swap(t, v=torch.randn(2, 2, 8, 16))),
    ("v", ValueError, lambda t: _swap(t, v=torch.randn(2, 1, 9, 16))),
    ("causal|q", ValueError, lambda t: _swap(t, q=torch.randn(2, 4, 10, 16))),
]
BAD_KWARGS = [
    ("key_mask", TypeError, dict(key_mask=torch.ones(2, 9))),
    ("key_mask", TypeError, dict(key_mask=torch.ones(2, 9, dtype=torch.uint8))),
    ("key_mask", TypeError, dict(key_mask=[[True] * 9] * 2)),
    ("key_mask", ValueError, dict(key_mask=torch.ones(2, 5, dtype=torch.bool))),  # (B, N), not (B, N_k)
    ("key_mask", ValueError, dict(key_mask=torch.ones(2, 1, 1, 9, dtype=torch.bool))),
    ("key_mask", ValueError, dict(key_mask=torch.ones(2, 9, dtype=torch.bool, device="meta"))),
    ("scale", ValueError, dict(scale=0.0)),
    ("scale", ValueError, dict(scale=-0.1)),
    ("scale", ValueError, dict(scale=float("nan"))),
    ("scale", ValueError, dict(scale=float("inf"))),
    ("scale", (TypeError, ValueError), dict(scale="0.1")),
    ("scale", (TypeError, ValueError), dict(scale=True)),
    ("scale", (TypeError, ValueError), dict(scale=1j)),
]


@pytest.mark.parametrize("match,error,make", BAD, ids=[f"{i}-{m}" for i, (m, _, _) in enumerate(BAD)])
def test_bad_tensors_name_the_argument(match, error, make):
    with pytest.raises(error, match=match):
        _call(make(_good()))


@pytest.mark.parametrize("match,error,kwargs", BAD_KWARGS, ids=[f"{i}-{m}" for i, (m, _, _) in
                                                                 enumerate(BAD_KWARGS)])
def test_bad_key_mask_or_scale_names_the_argument(match, error, kwargs):
    with pytest.raises(error, match=match):
        _call(_good(), **kwargs)


def test_accepted_edge_arguments():
    """Non-causal N > N_k is allowed; an int scale is a real number; causal N == N_k is allowed."""
    t = _good()
    assert _call(_swap(t, q=torch.randn(2, 4, 12, 16)), causal=False).shape == (2, 4, 12, 16)
    assert torch.allclose(_call(t, scale=1), _call(t, scale=1.0))
    assert _call(_swap(t, q=torch.randn(2, 4, 9, 16))).shape == (2, 4, 9, 16)
