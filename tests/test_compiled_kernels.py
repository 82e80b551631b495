"""What a GPU would run, checked without one: every launch the launcher can choose, compiled
ahead of time for sm_80, sm_90 and sm_100 exactly as a launch would specialise it, by the
installed Triton and the ptxas inside its wheel (fastdpl/kernels/compiled.py).

Per launch: it compiles; ptxas reports no register spills (none is tolerated: the tile
table, fastdpl/kernels/configs.py, is chosen so that every launch fits on every Triton it was made
for); shared memory fits the part's per-block limit; every main dot (QK^T, PV, dO V^T,
dS K, dS^T Q and the prompt-side ones) runs on tensor cores, for bf16, fp16 and fp32 as
users get it by default (tf32x3) or with TF32 allowed. Only the one-hot per-candidate
gathers stay on FMA, on purpose (exact fp32 sums).

CI compiles a covering subset (every precision x head dim on every part, N and mask
cycling through the tile table's rows, every language-model row: grouped-query heads,
a key mask, N 512 and 2048; and ViT-B/16 with VPT-deep's lengths); FASTDPL_COMPILE_MATRIX=full compiles the whole
matrix (the tables committed in benchmarks/results/, one per Triton version, come from
that run). The compilation runs in a subprocess: the kernels of this process are
interpreted when TRITON_INTERPRET=1 (CI), and interpreted kernels cannot be compiled.
"""
import itertools
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

MATRIX = os.environ.get("FASTDPL_COMPILE_MATRIX", "ci")
TRITON = __import__("triton").__version__


@pytest.fixture(scope="module")
def compiled_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "fastdpl.kernels.compiled", "--matrix", MATRIX, "--target", "sm90,sm80,sm100",
         "--workers", str(min(8, os.cpu_count() or 1)), "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


def _failures(rows, predicate, what):
    bad = [f"{r['variant']} {r['kernel']}: {what(r)}" for r in rows if predicate(r)]
    return "\n".join(bad[:40]) + (f"\n... {len(bad) - 40} more" if len(bad) > 40 else "")


def test_every_launch_compiles(compiled_rows):
    kernels = {r["kernel"] for r in compiled_rows}
    assert kernels == {"forward", "prompt_bwd", "kv_bwd", "q_bwd"}
    assert {r["arch"] for r in compiled_rows} == {90, 80, 100}
    assert not any("error" in r for r in compiled_rows), _failures(compiled_rows, lambda r: "error" in r,
                                                                  lambda r: r["error"])


def test_language_model_rows_are_compiled(compiled_rows):
    """Every language-model row (32 query heads over 8 key/value heads, causal with a key mask, the
    LM candidate lengths; N 512 and 2048, head dim 64 and 128, bf16 and fp32) on every part, all
    four launches each: the checks below hold for them as for the CLIP rows."""
    from fastdpl.kernels import compiled

    lm = {(r["arch"], r["dtype"], r["head_dim"], r["n"], r["kernel"]) for r in compiled_rows if r["family"] == "lm"}
    expected = {(compiled.TARGETS[a].arch, d, h, n, kernel) for a in compiled.ARCHES
                for (d, _), h, n in itertools.product(compiled.LM_PRECISIONS, compiled.LM_HEAD_DIMS,
                                                      compiled.LM_SEQ_LENS)
                for kernel in ("forward", "prompt_bwd", "kv_bwd", "q_bwd")}
    assert lm == expected


def test_vit_rows_are_compiled(compiled_rows):
    """ViT-B/16's image tower (197 tokens, 12 heads of 64, not causal) with VPT-deep's candidate
    lengths (0, 1, 5, 10) in bf16 and fp32 on every part, all four launches each."""
    from fastdpl.kernels import compiled

    vit = {(r["arch"], r["dtype"], r["kernel"]) for r in compiled_rows if r["family"] == "vit"}
    precisions = compiled.PRECISIONS if MATRIX == "full" else compiled.VIT_CI_PRECISIONS
    assert vit == {(compiled.TARGETS[a].arch, d, kernel) for a in compiled.ARCHES for d, _ in precisions
                   for kernel in ("forward", "prompt_bwd", "kv_bwd", "q_bwd")}


def test_no_register_spills(compiled_rows):
    rows = [r for r in compiled_rows if "error" not in r]
    assert all(r["spill_stores"] is not None for r in rows), "ptxas log not read"
    spilled = lambda r: r["spill_stores"] > 0 or r["spill_loads"] > 0  # noqa: E731
    assert not any(spilled(r) for r in rows), _failures(
        rows, spilled, lambda r: f"{r['registers']} regs, {r['spill_stores']} B spill stores, tiles {r['blocks']} "
                                 f"w{r['num_warps']} s{r['num_stages']} (triton {TRITON})")


def test_shared_memory_within_the_part(compiled_rows):
    rows = [r for r in compiled_rows if "error" not in r]
    over = lambda r: r["shared"] > r["shared_limit"]  # noqa: E731
    assert not any(over(r) for r in rows), _failures(rows, over, lambda r: f"{r['shared']} B > {r['shared_limit']} B")


def test_main_dots_run_on_tensor_cores(compiled_rows):
    rows = [r for r in compiled_rows if "error" not in r]
    assert all(r["main_tc"] > 0 for r in rows)
    # Every dot is attributed to _mma or _per_candidate (nothing unaccounted for).
    assert not any(r["other"] for r in rows), _failures(rows, lambda r: r["other"], lambda r: f"{r['other']} dots")
    fma = lambda r: r["main_fma"] > 0  # noqa: E731
    assert not any(fma(r) for r in rows), _failures(
        rows, fma, lambda r: f"{r['main_fma']} of {r['main_fma'] + r['main_tc']} main dots on FMA "
                             f"({r['dot_precision']})")
    # The exact one-hot gathers: two in the forward, three in the prompt backward, two in dQ (its prompt part).
    expected = {"forward": 2, "prompt_bwd": 3, "kv_bwd": 0, "q_bwd": 2}
    gathers = lambda r: r["gather_fma"] + r["gather_tc"] != expected[r["kernel"]]  # noqa: E731
    assert not any(gathers(r) for r in rows), _failures(rows, gathers, lambda r: f"{r['gather_fma']} gathers")


def test_no_atomics_anywhere(compiled_rows):
    """Determinism by construction: no kernel accumulates through atomics (the interpreter runs
    programs one after another, so a CPU run could never show an atomics race)."""
    rows = [r for r in compiled_rows if "error" not in r]
    assert not any(r["atomics"] for r in rows), _failures(rows, lambda r: r["atomics"], lambda r: f"{r['atomics']}")


def test_hopper_and_blackwell_use_their_tensor_core_instructions_for_large_tiles(compiled_rows):
    """On sm_90 the 64-row tiles and larger use warpgroup MMA, on sm_100 tcgen05; sm_80 has neither."""
    for r in compiled_rows:
        if "error" in r:
            continue
        large = r["kernel"] in ("forward", "q_bwd") and r["blocks"].get("BLOCK_M", 0) >= 64
        if r["arch"] == 80:
            assert r["wgmma"] == 0 and r["tcgen05"] == 0, r["variant"]
        elif r["arch"] == 90 and large:
            assert r["wgmma"] > 0, f"{r['variant']} {r['kernel']}: no wgmma"
        elif r["arch"] == 100 and large:
            assert r["tcgen05"] > 0, f"{r['variant']} {r['kernel']}: no tcgen05"


# ---- the launch options themselves (no compile) ---------------------------------------------------
def _launches(arch, dtype="bfloat16", head_dim=64, n=197):
    from fastdpl.kernels import compiled
    return {x.name: x for x in compiled.launches_for(compiled.Variant(dtype, None, head_dim, n, False, arch))}


def test_every_launch_carries_the_register_ceiling_and_the_arch_changes_only_what_does_not_fit():
    from fastdpl.kernels.configs import REGISTER_CEILING
    ampere, hopper, blackwell = _launches("sm80"), _launches("sm90"), _launches("sm100")
    for launches in (ampere, hopper, blackwell, _launches("sm80", "float32", 128, 20)):
        assert {x.meta.get("maxnreg") for x in launches.values()} == {REGISTER_CEILING}
    stages = lambda launches, name: (launches[name].meta["BLOCK_M"], launches[name].meta["num_stages"])  # noqa: E731
    assert stages(hopper, "forward") == stages(ampere, "forward") == (128, 2)
    assert stages(blackwell, "forward") == (128, 1)
    keys = lambda launches: (launches["kv_bwd"].meta["BLOCK_N"], launches["kv_bwd"].grid)  # noqa: E731
    assert keys(hopper) == keys(blackwell) == (64, (4, 24)) and keys(ampere) == (32, (7, 24))
    # Nothing else moves with the arch, and the prompt gradients' tiling (their summation order) never does.
    for name in ("kv_bwd", "q_bwd", "prompt_bwd"):
        assert hopper[name].meta == blackwell[name].meta and hopper[name].grid == blackwell[name].grid


@pytest.mark.parametrize("spec", ["16x32w8s2", "16x32w4s2k16", "128x64w8s1r0", "64x64w8s2k32r168"])
def test_tile_specs_read_back_as_they_print(spec, monkeypatch):
    from fastdpl.kernels.configs import override, parse_tiles
    assert str(parse_tiles(spec)) == spec
    monkeypatch.setenv("FASTDPL_TILES", f"kv=16x16w4s1,forward={spec}")
    assert str(override("forward")) == spec and override("q") is None


@pytest.mark.parametrize("spec", ["forward=16x32", "forward=16x32w8s2k", "attention=16x32w8s2", "forward=16x32w8s2r-1"])
def test_bad_tile_specs_are_refused_by_name(spec, monkeypatch):
    from fastdpl.kernels.configs import override
    monkeypatch.setenv("FASTDPL_TILES", spec)
    with pytest.raises(ValueError, match="FASTDPL_TILES"):
        override("forward")
