"""The op's contract beyond numerics: input checks, engine choice, torch.library
registration, torch.compile, and running without Triton."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastdpl
from fastdpl.ops import mixture_prefix_attention, resolve_impl
from helpers import DEVICE, TOLERANCE, TRITON_DEVICE, Case, assert_matches, make_inputs

needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton needs CUDA or TRITON_INTERPRET=1")
CASE = Case(2, 2, 9, 16, (0, 2, 3), False)


def _inputs(case=CASE, dtype=torch.float32, device="cpu"):
    tensors, _ = make_inputs(case, dtype, device, seed=1)
    return [t.detach() for t in tensors]


def _call(q, k, v, pk, pv, w, lengths=CASE.lengths, **kwargs):
    return mixture_prefix_attention(q, k, v, pk, pv, lengths, w, **kwargs)


# ---- bad input: each names the argument at fault --------------------------------------------------

def _replace(index, value):
    args = _inputs()
    args[index] = value
    return args


BAD_TENSOR_INPUTS = [
    ("k", ValueError, lambda: _replace(1, torch.randn(2, 2, 8, 16))),
    ("v", ValueError, lambda: _replace(2, torch.randn(2, 2, 9, 8))),
    ("q", ValueError, lambda: _replace(0, torch.randn(2, 9, 16))),
    ("prompt_k", ValueError, lambda: _replace(3, torch.randn(2, 4, 16))),
    ("prompt_v", ValueError, lambda: _replace(4, torch.randn(3, 5, 16))),
    ("weights", ValueError, lambda: _replace(5, torch.rand(4))),
    ("weights", ValueError, lambda: _replace(5, torch.rand(1, 3))),
    ("k", TypeError, lambda: _replace(1, torch.randn(2, 2, 9, 16, dtype=torch.float64))),
    ("prompt_v", TypeError, lambda: _replace(4, torch.randn(2, 5, 16).half())),
    ("q", TypeError, lambda: _replace(0, torch.ones(2, 2, 9, 16, dtype=torch.long))),
    ("weights", TypeError, lambda: _replace(5, torch.ones(3, dtype=torch.long))),
    ("v", TypeError, lambda: _replace(2, [[1.0]])),
    ("prompt_k", ValueError, lambda: _replace(3, torch.randn(2, 5, 16, device="meta"))),
    ("weights", ValueError, lambda: _replace(5, torch.rand(3, device="meta"))),
]


@pytest.mark.parametrize("name,error,make", BAD_TENSOR_INPUTS, ids=[f"{n}-{e.__name__}-{i}" for i, (n, e, _) in
                                                                      enumerate(BAD_TENSOR_INPUTS)])
def test_bad_tensor_raises_naming_argument(name, error, make):
    with pytest.raises(error, match=name):
        _call(*make())


@pytest.mark.parametrize("lengths,error", [
    ((0, 2, 2), ValueError),        # sums to 4, prompt_k has 5 rows
    ((0, 2, 4), ValueError),        # sums to 6
    ((0, -1, 6), ValueError),       # negative
    ((0, 2.0, 3), TypeError),       # not ints
    ((0, True, 4), TypeError),      # bools are not lengths
    ("023", TypeError),
    (5, TypeError),
    ((), ValueError),
])
def test_bad_candidate_lengths_raise_naming_argument(lengths, error):
    q, k, v, pk, pv, w = _inputs()
    with pytest.raises(error, match="candidate_lengths|prompt_k|weights"):
        _call(q, k, v, pk, pv, w, lengths=lengths)


def test_lengths_mismatch_message_names_prompt_rows():
    q, k, v, pk, pv, w = _inputs()
    with pytest.raises(ValueError, match=r"prompt_k must have shape \(H_kv, sum\(candidate_lengths\), D\)"):
        _call(q, k, v, pk, pv, w, lengths=(1, 2, 3))


def test_bad_impl_raises():
    with pytest.raises(ValueError, match="impl must be one of"):
        _call(*_inputs(), impl="cuda")


def test_candidate_lengths_accept_range_and_tensor():
    # The same engine on the same lengths, however they are spelled: the same bits.
    args = _inputs()
    expected = _call(*args, lengths=tuple(CASE.lengths), impl="eager")
    assert torch.equal(_call(*args, lengths=torch.tensor(CASE.lengths), impl="eager"), expected)
    case = Case(1, 1, 4, 8, (0, 1, 2), True)
    args = _inputs(case)
    assert torch.equal(_call(*args, lengths=range(3), causal=True, impl="eager"),
                       _call(*args, lengths=[0, 1, 2], causal=True, impl="eager"))


def test_auto_resolves_by_device():
    assert resolve_impl("auto", torch.device("cpu")) == "eager"
    if fastdpl.ops.triton_available():
        assert resolve_impl("auto", torch.device("cuda")) == "triton"


@needs_triton
def test_triton_rejects_unsupported_head_dim():
    case = Case(1, 1, 4, 8, (1,), False)
    with pytest.raises(ValueError, match="q: impl='triton' supports head dims"):
        _call(*_inputs(case, device=TRITON_DEVICE), lengths=case.lengths, impl="triton")


@needs_triton
def test_triton_refuses_float64_by_name():
    with pytest.raises(TypeError, match="q: impl='triton' supports float16, bfloat16 and float32"):
        _call(*_inputs(dtype=torch.float64, device=TRITON_DEVICE), impl="triton")


# ---- torch.library registration and torch.compile -------------------------------------------------

@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_forward_and_backward_ops(causal):
    case = Case(2, 2, 19, 16, (0, 3, 0, 2), causal)
    tensors, grad_out = make_inputs(case, torch.float32, TRITON_DEVICE, seed=2)
    q, k, v, pk, pv, w = tensors
    fwd_args = (q, k, v, pk, pv, list(case.lengths), w, causal, case.head_dim ** -0.5, None)
    torch.library.opcheck(torch.ops.fastdpl.mixture_attention_fwd.default, fwd_args)
    with torch.no_grad():
        _, out_x, row_max, row_sum, denominators = torch.ops.fastdpl.mixture_attention_fwd(*fwd_args)
    bwd_args = (grad_out, *(t.detach() for t in (q, k, v, pk, pv)), list(case.lengths), w.detach(),
                out_x, row_max, row_sum, denominators, causal, case.head_dim ** -0.5, None)
    torch.library.opcheck(torch.ops.fastdpl.mixture_attention_bwd.default, bwd_args)


def _compiled_matches_eager(impl, device, backend="inductor"):
    """torch.compile(fullgraph=True) of a function around the op, at two N (dynamic shapes)."""

    def block(q, k, v, pk, pv, arch_logits, lengths, causal):
        weights = torch.softmax(arch_logits, dim=0)  # the op's usual input: softmax(alpha)
        out = mixture_prefix_attention(q, k, v, pk, pv, lengths, weights, causal=causal, impl=impl)
        return out * 2.0 + 1.0

    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend=backend)
    for n, causal in ((13, True), (29, True), (7, False)):
        case = Case(2, 2, n, 16, (0, 1, 4), causal)
        tensors, grad_out = make_inputs(case, torch.float32, device, seed=n)
        q, k, v, pk, pv, w = tensors
        logits = torch.log(w.detach()).requires_grad_()
        leaves = (q, k, v, pk, pv, logits)
        expected = block(*leaves, case.lengths, causal)
        expected_grads = torch.autograd.grad(expected, leaves, grad_out)
        actual = compiled(*leaves, case.lengths, causal)
        actual_grads = torch.autograd.grad(actual, leaves, grad_out)
        assert_matches(actual, expected.detach(), TOLERANCE[torch.float32], f"compiled out N={n}")
        for name, a, e in zip(("dq", "dk", "dv", "dprompt_k", "dprompt_v", "darch_logits"), actual_grads,
                              expected_grads):
            assert_matches(a, e, TOLERANCE[torch.float32], f"compiled {name} N={n}")


@needs_triton
@pytest.mark.slow
def test_compile_fullgraph_triton_matches_eager_with_dynamic_n():
    _compiled_matches_eager("triton", TRITON_DEVICE)


@pytest.mark.slow
def test_compile_fullgraph_eager_engine_matches_eager_with_dynamic_n():
    _compiled_matches_eager("eager", "cpu")


@needs_triton
def test_compile_does_not_recompile_for_new_n():
    """Dynamic shapes: after the first call, new N and batch sizes reuse the same graph."""
    compiles = []

    def counting_backend(graph_module, example_inputs):
        compiles.append(graph_module)
        return graph_module.forward

    @torch.compile(fullgraph=True, dynamic=True, backend=counting_backend)
    def block(q, k, v, pk, pv, w):
        return mixture_prefix_attention(q, k, v, pk, pv, (0, 1, 4), w, causal=True, impl="triton")

    # Sizes kept distinct and > 1: torch specialises 0/1 and "duck-sizes" equal dims.
    for batch, n in ((2, 11), (4, 23), (5, 40)):
        case = Case(batch, 3, n, 16, (0, 1, 4), True)
        tensors, _ = make_inputs(case, torch.float32, TRITON_DEVICE, seed=n)
        out = block(*(t.detach() for t in tensors))
        assert out.shape == (batch, 3, n, 16)
    assert len(compiles) == 1, f"recompiled {len(compiles) - 1} times"


# ---- no Triton ------------------------------------------------------------------------------------

def test_import_and_eager_without_triton():
    """In a fresh interpreter where `import triton` fails, fastdpl imports and runs on the CPU."""
    script = textwrap.dedent("""
        import sys

        class HideTriton:  # wraps an import finder so that Triton looks not installed

            def __init__(self, finder):
                self.finder = finder

            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "triton" or not hasattr(self.finder, "find_spec"):
                    return None
                return self.finder.find_spec(name, path, target)

        sys.meta_path[:] = [HideTriton(finder) for finder in sys.meta_path]
        import torch
        import fastdpl
        from fastdpl.ops import mixture_prefix_attention, triton_available, resolve_impl

        assert not triton_available()
        assert resolve_impl("auto", torch.device("cpu")) == "eager"
        q, k, v = (torch.randn(2, 3, 7, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
        pk, pv = (torch.randn(3, 6, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
        w = torch.softmax(torch.randn(4, dtype=torch.float64), 0).requires_grad_()
        out = mixture_prefix_attention(q, k, v, pk, pv, [0, 1, 2, 3], w, causal=True)
        ref = mixture_prefix_attention(q, k, v, pk, pv, [0, 1, 2, 3], w, causal=True, impl="reference")
        error = ((out - ref).abs().max() / ref.abs().max()).item()
        assert error < 1e-12, error  # float64: the same function up to rounding
        out.sum().backward()
        assert w.grad is not None and pk.grad is not None
        try:
            mixture_prefix_attention(q, k, v, pk, pv, [0, 1, 2, 3], w, impl="triton")
        except ImportError as exc:
            assert "Triton" in str(exc)
        else:
            raise AssertionError("impl='triton' should fail without Triton")
        assert "triton" not in sys.modules
        print("ok")
    """)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


FACTORIES = ("tensor", "as_tensor", "arange", "ones", "zeros", "full", "eye", "repeat_interleave", "ones_like")


@pytest.mark.parametrize("impl", ["eager", pytest.param("triton", marks=needs_triton)])
def test_warm_calls_build_no_tensors(impl, monkeypatch):
    """After a first call, forward + backward construct no tensor from Python data (no
    host-to-device copy, no sync): segment ids, one-hots and masks are cached."""
    case = Case(2, 2, 19, 16, (0, 3, 0, 2), True)
    device = TRITON_DEVICE if impl == "triton" else DEVICE
    tensors, grad_out = make_inputs(case, torch.float32, device, seed=5)

    def call():
        q, k, v, pk, pv, w = tensors
        out = mixture_prefix_attention(q, k, v, pk, pv, case.lengths, w, causal=True, impl=impl)
        torch.autograd.grad(out, tensors, grad_out)

    call()
    built = []
    for name in FACTORIES:
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name,
                            lambda *a, _real=real, _name=name, **kw: built.append(_name) or _real(*a, **kw))
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert built == [], f"{impl}: tensors built per call: {built}"
