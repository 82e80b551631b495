"""benchmarks/gpu_check.sh keeps working: its CPU smoke mode runs every step at tiny sizes."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_writes_every_output(tmp_path):
    out = tmp_path / "gpu-check"
    # The script's python is this very interpreter (its venv need not be first on PATH).
    env = {**{k: v for k, v in os.environ.items() if k != "FASTDPL_TILES"}, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", str(out)],
                          capture_output=True, text=True, env=env, timeout=1200, cwd=tmp_path)
    log = (out / "steps.log").read_text() if (out / "steps.log").exists() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log
    names = {p.name for p in out.iterdir()}
    for level in ("compiled", "op", "block", "step", "tpt", "targets"):
        assert any(n.endswith(f"-smoke-{level}.json") for n in names), (level, sorted(names))
    for level in ("op", "block", "step", "tpt"):
        assert any(n.endswith(f"-smoke-{level}.png") for n in names), (level, sorted(names))
    compiled = json.loads(next(out.glob("*-compiled.json")).read_text())["rows"]
    assert {r["kernel"] for r in compiled} == {"forward", "prompt_bwd", "kv_bwd", "q_bwd"}
    assert not any("error" in r for r in compiled)
    targets = json.loads(next(out.glob("*-targets.json")).read_text())
    # Smoke shapes are not the targets' shapes: every target is listed, none is claimed as met.
    assert targets["targets"] and all(t["met"] is None for t in targets["targets"])
    assert "steps.log" in names and "environment.txt" in names
