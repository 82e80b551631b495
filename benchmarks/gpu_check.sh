#!/usr/bin/env bash
# One command on a GPU machine: validate and measure fastdpl's kernels, in under 9 minutes.
#
#   benchmarks/gpu_check.sh [OUT_DIR]          on a GPU machine (default OUT_DIR: bench-out/gpu-check)
#   benchmarks/gpu_check.sh --smoke [OUT_DIR]  on a CPU: the same steps at tiny sizes (CI runs this)
#
# Works on a bare machine that has torch and triton of its own: wheels it lacks are
# installed from .whl/ when present (../shared/tools/device-wheels fetches them), and
# fastdpl itself is installed in editable mode without touching the network.
# Steps, each under its own time limit so that one slow step cannot sink the rest:
#   1. environment (GPU, driver, versions) -> environment.txt
#   2. the kernel tests, compiled (no interpreter), in parallel -> tests.log, tests.xml
#   3. the compiled-code check on this very GPU (every launch the launcher can choose:
#      registers, spills, shared memory, tensor-core dots) -> compiled.json / .md
#   4. the op, block, step, TPT, CoCoOp and language-model step suites at GPU shapes in bf16, against
#      every peer (SDPA per backend, FlexAttention, xformers, PEFT, the literal loops)
#      -> <prefix>-<level>.json/.md/.png
#   5. the targets, as ratios measured side by side -> <prefix>-targets.json / .md
# Results are named <date>-<gpu>-<level>.* so they can be committed to benchmarks/results/ as they are.
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
out=${1:-bench-out/gpu-check}
mkdir -p "$out"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$out/steps.log"; }
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, record how it ended
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  log "$name: start (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  log "$name: exit $rc after $((SECONDS - started))s"
  [ $rc -eq 0 ] || status=1
}

PY=${PYTHON:-python3}
if [ $smoke -eq 0 ]; then
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  $PY -c "import fastdpl.kernels" 2>/dev/null \
    || $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 \
    || { log "could not install fastdpl (see install.log)"; exit 1; }
  unset TRITON_INTERPRET
  device=cuda; dtype=bfloat16; workers=$(nproc)
else
  export TRITON_INTERPRET=1
  device=cpu; dtype=float32; workers=2
fi
gpu=$($PY - <<'EOF'
import torch
name = torch.cuda.get_device_name().lower() if torch.cuda.is_available() else "cpu"
print(next((k for k in ("h100", "h200", "a100", "l40s", "b200") if k in name), name.split()[-1]))
EOF
)
level=$([ $smoke -eq 1 ] && echo smoke || echo full)
prefix="$(date -u +%Y-%m-%d)-$gpu-$level"
log "device $gpu, outputs $out/$prefix-*"

# 1. environment
{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__)"
  $PY -m pip list 2>/dev/null | grep -iE "open.clip|xformers|nvtx|timm|transformers"
} >"$out/environment.txt" 2>&1

# 2. the kernel tests, compiled (pytest-xdist spreads the JIT compiles over the cores)
if [ $smoke -eq 0 ]; then
  xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
  step tests 240 bash -c "$PY -m pytest -q -p no:cacheprovider $xdist --junitxml='$out/tests.xml' \
    tests/test_mixture_attention.py tests/test_op_api.py tests/test_compiled_kernels.py >'$out/tests.log' 2>&1"
  tail -n 3 "$out/tests.log"
fi

# 3. the compiled-code check (on the GPU: this device's own target, through Triton's JIT)
if [ $smoke -eq 0 ]; then
  step compiled 120 env -u TRITON_INTERPRET $PY -m fastdpl.kernels.compiled --target native --matrix full \
    --workers "$workers" --json "$out/$prefix-compiled.json" --markdown "$out/$prefix-compiled.md"
else
  step compiled 300 env -u TRITON_INTERPRET $PY -m fastdpl.kernels.compiled --target sm90 --matrix smoke \
    --workers "$workers" --json "$out/$prefix-compiled.json" --markdown "$out/$prefix-compiled.md"
fi

# 4. the suites (smoke: tiny shapes on the CPU)
if [ $smoke -eq 0 ]; then
  # 240 s: the two language-model shapes (B=4, H=32, N=512/2048) add JIT and FlexAttention compiles
  # for new specialisations (~1 min, estimated) and ~10 s of literal reference loops at N=2048.
  step op 240 $PY -m fastdpl.cli bench op --device cuda --dtype bfloat16 --out "$out/$prefix-op.json"
  step block 60 $PY -m fastdpl.cli bench block --device cuda --dtype bfloat16 --out "$out/$prefix-block.json"
  step step 160 $PY -m fastdpl.cli bench step --device cuda --dtype bfloat16 --repeats 5 \
    --shapes b4-100cls,b4-1000cls,hf-clip-b32-100cls,hf-siglip-b32-100cls,siglip-b32-100cls --out "$out/$prefix-step.json"
  step tpt 60 $PY -m fastdpl.cli bench tpt --device cuda --dtype bfloat16 --repeats 5 \
    --shapes b16-64v-1000cls --out "$out/$prefix-tpt.json"
  step cocoop 90 $PY -m fastdpl.cli bench cocoop --device cuda --dtype bfloat16 --repeats 5 \
    --out "$out/$prefix-cocoop.json"
  # 150 s: per shape three Llama-3.2-1B-shaped models built on the GPU (seconds), the op's first
  # launches at B=4, N=512/2048, and 3 providers x 8 steps (literal ~3x a 0.2-0.6 s step, estimated).
  step lm 150 $PY -m fastdpl.cli bench lm --device cuda --dtype bfloat16 --repeats 5 --out "$out/$prefix-lm.json"
  # 90 s: ViT-B/16 (197 tokens) at batch 32 and 128, three providers x 7 steps; the op's first
  # launches for P = 16 prompt rows (estimated: the literal runs 4 attentions per block).
  step vit 90 $PY -m fastdpl.cli bench vit --device cuda --dtype bfloat16 --repeats 5 --out "$out/$prefix-vit.json"
else
  for level_name in op block step tpt cocoop lm vit; do
    step "$level_name" 300 $PY -m fastdpl.cli bench "$level_name" --device cpu --smoke --out "$out/$prefix-$level_name.json"
  done
fi

# 5. the targets
step targets 30 $PY -m fastdpl.bench.targets "$out" "$prefix-"
log "done: status $status"
exit $status
