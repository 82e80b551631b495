"""benchmarks/gpu_check.sh keeps working: its CPU smoke mode runs every step at tiny sizes, and
each benchmark suite's outputs are checked here on that one run (the JSON with provenance, the
markdown summary and the chart that `fastdpl bench LEVEL --smoke` writes); and the wheels the GPU
machine is sent cover what the script imports."""
import ast
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """The output folder of one `gpu_check.sh --smoke` run (which must succeed)."""
    out = tmp_path_factory.mktemp("gpu-check")
    # The script's python is this very interpreter (its venv need not be first on PATH).
    env = {**{k: v for k, v in os.environ.items() if k != "FASTDPL_TILES"}, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", str(out)],
                          capture_output=True, text=True, env=env, timeout=1200, cwd=out.parent)
    log = (out / "steps.log").read_text() if (out / "steps.log").exists() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log
    return out


def result(out: Path, level: str) -> dict:
    return json.loads(next(out.glob(f"*-smoke-{level}.json")).read_text())


def rows_of(out: Path, level: str) -> dict:
    return {r["provider"]: r for r in result(out, level)["rows"]}


def test_gpu_check_smoke_writes_every_output(smoke):
    names = {p.name for p in smoke.iterdir()}
    for level in ("compiled", "op", "block", "step", "tpt", "cocoop", "lm", "vit", "targets"):
        assert any(n.endswith(f"-smoke-{level}.json") for n in names), (level, sorted(names))
    for level in ("op", "block", "step", "tpt", "cocoop", "lm", "vit"):
        assert any(n.endswith(f"-smoke-{level}.png") for n in names), (level, sorted(names))
        assert "Command:" in next(smoke.glob(f"*-smoke-{level}.md")).read_text()
    compiled = result(smoke, "compiled")["rows"]
    assert {r["kernel"] for r in compiled} == {"forward", "prompt_bwd", "kv_bwd", "q_bwd"}
    assert not any("error" in r for r in compiled)
    targets = result(smoke, "targets")
    # Smoke shapes are not the targets' shapes: every target is listed, none is claimed as met.
    assert targets["targets"] and all(t["met"] is None for t in targets["targets"])
    assert "steps.log" in names and "environment.txt" in names
    assert "exit 0" in (smoke / "steps.log").read_text() and "skipped" not in (smoke / "steps.log").read_text()


def test_the_op_suite_records_provenance_and_every_provider(smoke):
    from fastdpl.bench import op
    import torch

    saved = result(smoke, "op")
    for key in ("device", "torch", "triton", "timestamp", "commit"):
        assert key in saved["environment"]
    providers = {r["provider"] for r in saved["rows"]}
    assert {"reference", "eager", "sdpa_n+max", "lse_merge_math", "triton"} <= providers  # interpreted
    for row in saved["rows"]:
        assert "error" not in row, row
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0
        assert row["q1_ms"] <= row["median_ms"] <= row["q3_ms"]
        assert row["tflops"] > 0
    # The grouped-query smoke shape: every CPU provider timed in both modes, against the N + max floor.
    lm = next(s for s in op.SMOKE_SHAPES if s.kv_heads < s.heads)
    assert next(s for s in saved["shapes"] if s["name"] == lm.name)["kv_heads"] == lm.kv_heads
    for mode in ("fwd", "fwd+bwd"):
        rows = {r["provider"]: r for r in saved["rows"] if r["shape"] == lm.name and r["mode"] == mode}
        assert set(rows) >= set(op.providers(torch.device("cpu"), lm)) and "sdpa_n+max_gqa" in rows
        assert rows["sdpa_n+max"]["vs_single_path"] == 1.0


def test_the_step_suite_times_every_model_family_and_the_compiled_search(smoke):
    saved = result(smoke, "step")
    shapes = {r["shape"] for r in saved["rows"]}
    assert shapes == {"smoke", "hf-clip-smoke", "hf-siglip-smoke", "siglip-smoke"}  # open_clip, HF, open_clip+timm
    for shape in shapes:
        rows = {r["provider"]: r for r in saved["rows"] if r["shape"] == shape}
        literal = {"literal", "train_literal"} if shape == "smoke" else set()  # literal: open_clip only
        compiled = {"search_compiled"} if shape == "smoke" else set()  # the smoke shape names a backend
        assert set(rows) == {"search", "single_path", "train"} | literal | compiled
        for row in rows.values():
            assert row["median_ms"] > 0 and row["first_call_s"] > 0
        assert rows["single_path"]["vs_single_path"] == 1.0
        for name in literal:
            assert rows[name]["literal_over_this"] == 1.0
        for name in compiled:  # against the eager search of the same run
            assert rows[name]["vs_search"] == rows[name]["median_ms"] / rows["search"]["median_ms"]


def test_the_block_tpt_and_cocoop_suites_time_their_providers(smoke):
    assert set(rows_of(smoke, "block")) == {"search", "single_path", "literal", "plain"}
    tpt = rows_of(smoke, "tpt")
    assert set(tpt) == {"fast", "fast_group4", "literal"} and tpt["literal"]["literal_over_this"] == 1.0
    assert all(r["median_ms"] > 0 and r["images_per_s"] > 0 for r in tpt.values())
    assert "fast_group4" in next(smoke.glob("*-smoke-tpt.md")).read_text()
    assert next(smoke.glob("*-smoke-tpt.png")).stat().st_size > 1000
    cocoop = rows_of(smoke, "cocoop")
    assert set(cocoop) == {"fast", "fast_chunked", "literal"} and cocoop["literal"]["literal_over_this"] == 1.0
    assert all(r["median_ms"] > 0 for r in cocoop.values())


def test_the_language_model_and_vit_suites_write_their_ratios(smoke):
    from fastdpl.bench import lm, vit

    saved = result(smoke, "lm")
    rows = {r["provider"]: r for r in saved["rows"]}
    assert set(rows) == set(lm.PROVIDERS) and saved["shapes"][0]["model"]["vocab"] == lm.SMOKE_SHAPES[0].model.vocab
    assert all("error" not in r and r["median_ms"] > 0 for r in rows.values()), rows
    assert rows["single_path"]["vs_single_path"] == 1.0 and rows["literal"]["literal_over_this"] == 1.0
    search = rows["search"]
    assert search["vs_single_path"] > 0 and search["literal_over_this"] > 0
    assert search["peak_memory_mb"] is None and search["memory_vs_single_path"] is None  # CPU: no memory
    assert rows["single_path"]["peer"].split()[0] in ("peft", "prefix-sdpa")
    assert rows["search_compiled"]["peer"] == "compile aot_eager"
    saved = result(smoke, "vit")
    rows = {r["provider"]: r for r in saved["rows"]}
    assert set(rows) == set(vit.PROVIDERS)
    assert rows["single_path"]["vs_single_path"] == 1.0 and rows["literal"]["literal_over_this"] == 1.0
    assert rows["search"]["vs_single_path"] == pytest.approx(rows["search"]["median_ms"] /
                                                             rows["single_path"]["median_ms"])
    assert saved["shapes"][0]["name"] == vit.SMOKE_SHAPES[0].name


# ---- what the GPU machine needs: its own packages (machine.txt) or the carried wheels (wheels.txt) ----

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
LISTS = ROOT / "benchmarks" / "gpu-machine"


def _names(path: Path) -> dict:
    """{normalised distribution name: pinned version or None} of a requirements-style list."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            pins = [s.version for s in requirement.specifier if s.operator == "=="]
            found[_normal(requirement.name)] = pins[0] if pins else None
    return found


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _guarded(tree) -> set:
    """Import nodes inside a ``try`` that catches ImportError (optional imports)."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is None or any(n in ast.unparse(h.type) for n in ("ImportError", "ModuleNotFoundError",
                                                                           "Exception"))
                for h in node.handlers):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return guarded


def _imports(path: Path, module: str, top_level_only: bool = False):
    """(project modules, external top-level names) imported by a file: every import, at any depth
    (functions too), unless ``top_level_only``; optional (guarded) imports left out."""
    tree = ast.parse(path.read_text())
    guarded = _guarded(tree)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    inner, outer = set(), set()
    for node in nodes:
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            targets = [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            targets = [(base, tuple(a.name for a in node.names))]
        else:
            continue
        for name, members in targets:
            top = name.split(".")[0]
            if top in ("fastdpl", "helpers") or node.__class__ is ast.ImportFrom and node.level:
                inner.add(name)
                inner |= {f"{name}.{m}" for m in members if _module_file(f"{name}.{m}")}
            elif top not in sys.stdlib_module_names and top != "__future__":
                outer.add(top)
    return inner, outer


def _external_imports() -> set:
    """Top-level names of every non-project module that gpu_check.sh's steps can import: its
    ``python -m fastdpl...`` modules and ``bench`` suites, and the kernel test files it runs (with
    conftest.py and helpers.py), following the project's own imports at any depth."""
    text = SCRIPT.read_text()
    roots = set(re.findall(r"-m (fastdpl(?:\.\w+)+)", text)) - {"fastdpl.cli"}
    suites = set(re.findall(r"fastdpl\.cli bench (\w+)", text))
    for loop in re.findall(r"for level_name in ([\w ]+); do", text):
        suites |= set(loop.split())
    roots |= {f"fastdpl.bench.{s}" for s in suites}
    files = {ROOT / p for p in re.findall(r"tests/test_\w+\.py", text)} | {ROOT / "tests" / "conftest.py"}
    assert suites and roots and len(files) >= 3, (suites, roots, files)
    _, outer = _imports(ROOT / "fastdpl" / "cli.py", "fastdpl.cli", top_level_only=True)  # `fastdpl.cli bench`
    seen, todo = set(), [(f, "tests." + f.stem) for f in files] + [(_module_file(m), m) for m in roots]
    while todo:
        path, module = todo.pop()
        if path is None or path in seen:
            continue
        seen.add(path)
        inner, found = _imports(path, module)
        outer |= found
        for name in inner:
            file = ROOT / "tests" / "helpers.py" if name == "helpers" else _module_file(name)
            todo.append((file, name))
            parts = name.split(".")  # a package's __init__ runs before its module
            todo += [(_module_file(".".join(parts[:i])), ".".join(parts[:i])) for i in range(2, len(parts))]
    return outer


def test_the_carried_wheels_cover_what_gpu_check_imports():
    machine, wheels = _names(LISTS / "machine.txt"), _names(LISTS / "wheels.txt")
    assert wheels and all(wheels.values()), "every carried wheel is pinned"
    assert not set(machine) & set(wheels), "a package is either the machine's or carried, not both"
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for name in sorted(_external_imports()):
        assert name in distributions, f"gpu_check.sh's steps import {name}, which is not installed here"
        for dist in distributions[name]:
            if _normal(dist) not in machine and _normal(dist) not in wheels:
                missing[name] = dist
    assert not missing, f"imported by gpu_check.sh's steps, on neither list: {missing}"
    # every carried wheel's own requirements (no extras, on the machine's Python 3.12 / Linux)
    environment = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    for dist in wheels:
        for line in importlib.metadata.requires(dist) or []:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            assert _normal(requirement.name) in set(machine) | set(wheels), \
                f"{dist} needs {requirement.name}: add it to benchmarks/gpu-machine/wheels.txt"


def test_the_import_scan_sees_the_steps_imports():
    """The scan is not vacuous: the suites' lazy imports (open_clip, transformers, peft) and the
    carried packages' own names show up."""
    found = _external_imports()
    assert {"torch", "triton", "open_clip", "transformers", "nvtx", "xformers", "pytest"} <= found, sorted(found)
