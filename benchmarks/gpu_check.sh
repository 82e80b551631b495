#!/usr/bin/env bash
# One command on a GPU machine: validate and measure fastdpl's kernels and steps inside one device call.
#
#   benchmarks/gpu_check.sh [--budget S] [--archive FILE] [OUT_DIR]   on the GPU machine
#   benchmarks/gpu_check.sh --smoke [OUT_DIR]                         on a CPU: every step at tiny sizes (CI;
#                                                                     the suites in one process)
#   benchmarks/gpu_check.sh --rehearse [--archive FILE] [OUT_DIR]     on a CPU: the GPU run's installs and
#                                                                     plumbing, smoke sizes (rehearse_gpu_check.sh)
# OUT_DIR defaults to bench-out/gpu-check. On the device tool (docs/gpu.md):
#   benchmarks/fetch_wheels.sh        # here, once: .whl/ (benchmarks/gpu-machine/wheels.txt)
#   run(command="bash benchmarks/gpu_check.sh --archive $OUT/gpu-check.tar.gz", carry=[".whl"], timeout_s=600)
# --archive packs OUT_DIR into one .tar.gz after every step (the device tool returns at most 8
# files, and a call killed at its limit keeps what the steps before it wrote).
#
# The GPU machine has torch and triton of its own and no internet: the wheels it lacks are
# installed from .whl/ into $FASTDPL_SITE (default /tmp/site, put on PYTHONPATH) without an index,
# and fastdpl itself in editable mode without the network. Steps, most important first, each under
# its own time limit and inside --budget seconds in all (default 540: the device tool's 10-minute
# call less the start and the transfers), so that one slow step cannot sink the rest:
#   1. environment (GPU, driver, versions) -> environment.txt
#   2. the kernel tests, compiled (no interpreter), in parallel -> tests.log, tests.xml
#      (rehearsal: collected, not run: the CPU suite runs them in the same versions' venv)
#   3. the compiled-code check on this very GPU (every launch the launcher can choose:
#      registers, spills, shared memory, tensor-core dots) -> <prefix>-compiled.json / .md
#   4. the step, language-model, op, ViT, TPT, CoCoOp and block suites at GPU shapes in bf16, against
#      every peer (SDPA per backend, FlexAttention, xformers, PEFT, the literal loops, torch.compile)
#      -> <prefix>-<level>.json/.md/.png
#   5. the targets, as ratios measured side by side -> <prefix>-targets.json / .md
# Results are named <date>-<gpu>-<level>.* so they can be committed to benchmarks/results/ as they are.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=full budget=540 archive=""
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) mode=smoke; shift ;;
    --rehearse) mode=rehearse; shift ;;
    --budget) budget=$2; shift 2 ;;
    --archive) archive=$2; shift 2 ;;
    -*) echo "gpu_check.sh: unknown option $1 (--smoke, --rehearse, --budget S, --archive FILE)" >&2; exit 2 ;;
    *) break ;;
  esac
done
out=${1:-bench-out/gpu-check}
mkdir -p "$out"
started_all=$SECONDS
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$out/steps.log"; }
pack() {  # the whole OUT_DIR as one archive, replaced atomically
  [ -n "$archive" ] || return 0
  mkdir -p "$(dirname "$archive")"
  tar czf "$archive.part" -C "$out" . && mv "$archive.part" "$archive"
}
status=0
reserve=30  # seconds kept for the targets step and the last archive
step() {  # step NAME SECONDS COMMAND...: run within its limit and what is left of the budget
  local name=$1 limit=$2; shift 2
  local left=$((budget - (SECONDS - started_all) - reserve))
  [ "$name" = targets ] && left=$((budget - (SECONDS - started_all)))
  if [ "$mode" != full ]; then left=$limit; fi
  if [ $left -lt 15 ]; then log "$name: skipped (budget of ${budget}s spent)"; status=1; return; fi
  [ $left -lt $limit ] && limit=$left
  local started=$SECONDS
  log "$name: start (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  log "$name: exit $rc after $((SECONDS - started))s"
  [ $rc -eq 0 ] || status=1
  pack
}

PY=${PYTHON:-python3}
if [ "$mode" != smoke ]; then  # the GPU machine's installs (rehearsed on a CPU by --rehearse)
  site=${FASTDPL_SITE:-/tmp/site}
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    PIP_NO_INDEX=1 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" .whl/*.whl >"$out/wheels.log" 2>&1 \
      || { log "could not install .whl/ into $site (see wheels.log)"; pack; exit 1; }
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # fastdpl's own metadata and console script (importing from the root alone would not give them)
  $PY -c "import importlib.metadata as m; m.version('fastdpl')" 2>/dev/null \
    || PIP_NO_INDEX=1 $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 \
    || { log "could not install fastdpl (see install.log)"; pack; exit 1; }
fi
if [ "$mode" = full ]; then
  unset TRITON_INTERPRET
  workers=$(nproc)
else
  export TRITON_INTERPRET=1
fi
gpu=$($PY - <<'EOF'
import torch
name = torch.cuda.get_device_name().lower() if torch.cuda.is_available() else "cpu"
print(next((k for k in ("h100", "h200", "a100", "l40s", "b200") if k in name), name.split()[-1]))
EOF
)
level=$([ "$mode" = full ] && echo full || echo "$mode")
prefix="$(date -u +%Y-%m-%d)-$gpu-$level"
log "mode $mode, device $gpu, outputs $out/$prefix-*"

# 1. environment
{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__)"
  $PY -m pip list 2>/dev/null | grep -iE "^(torch|triton|open.clip.torch|xformers|nvtx|timm|transformers|peft|numpy|tokenizers|ftfy) "
  [ -n "${PYTHONPATH:-}" ] && ls "${PYTHONPATH%%:*}" 2>/dev/null | grep -i "dist-info"
} >"$out/environment.txt" 2>&1
pack

# 2. the kernel tests, compiled (pytest-xdist spreads the JIT compiles over the cores)
kernel_tests="tests/test_mixture_attention.py tests/test_op_api.py tests/test_compiled_kernels.py"
if [ "$mode" = full ]; then
  xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
  step tests 240 bash -c "$PY -m pytest -q -p no:cacheprovider $xdist --junitxml='$out/tests.xml' \
    $kernel_tests >'$out/tests.log' 2>&1"
  tail -n 3 "$out/tests.log"
elif [ "$mode" = rehearse ]; then
  step tests 120 bash -c "$PY -m pytest -q -p no:cacheprovider --collect-only --junitxml='$out/tests.xml' \
    $kernel_tests >'$out/tests.log' 2>&1"
  tail -n 1 "$out/tests.log"
fi

# 3. the compiled-code check (on the GPU: this device's own target, through Triton's JIT)
if [ "$mode" = full ]; then
  step compiled 120 env -u TRITON_INTERPRET $PY -m fastdpl.kernels.compiled --target native --matrix full \
    --workers "$workers" --json "$out/$prefix-compiled.json" --markdown "$out/$prefix-compiled.md"
else  # one variant: compiled in this process (no pool of workers to start)
  step compiled 300 env -u TRITON_INTERPRET $PY -m fastdpl.kernels.compiled --target sm90 --matrix smoke \
    --workers 1 --json "$out/$prefix-compiled.json" --markdown "$out/$prefix-compiled.md"
fi

# 4. the suites (smoke and rehearsal: tiny shapes on the CPU)
if [ "$mode" = full ]; then
  # 160 s: five shapes x three providers x 7 steps, plus the compiled search at b4-100cls (inductor's
  # first compile of a ViT-B/16 CLIP step: about a minute, estimated).
  step step 160 $PY -m fastdpl.cli bench step --device cuda --dtype bfloat16 --repeats 5 \
    --shapes b4-100cls,b4-1000cls,hf-clip-b32-100cls,hf-siglip-b32-100cls,siglip-b32-100cls --out "$out/$prefix-step.json"
  # 150 s: per shape three Llama-3.2-1B-shaped models built on the GPU (seconds), the op's first
  # launches at B=4, N=512/2048, 3 providers x 8 steps, and the compiled search at N=512.
  step lm 150 $PY -m fastdpl.cli bench lm --device cuda --dtype bfloat16 --repeats 5 --out "$out/$prefix-lm.json"
  # 120 s: the two language-model shapes (B=4, H=32, N=512/2048) add JIT and FlexAttention compiles
  # for new specialisations (~1 min, estimated) and ~10 s of literal reference loops at N=2048.
  step op 120 $PY -m fastdpl.cli bench op --device cuda --dtype bfloat16 --out "$out/$prefix-op.json"
  # 90 s: ViT-B/16 (197 tokens) at batch 32 and 128, three providers x 7 steps; the op's first
  # launches for P = 16 prompt rows (estimated: the literal runs 4 attentions per block).
  step vit 90 $PY -m fastdpl.cli bench vit --device cuda --dtype bfloat16 --repeats 5 --out "$out/$prefix-vit.json"
  step tpt 60 $PY -m fastdpl.cli bench tpt --device cuda --dtype bfloat16 --repeats 5 \
    --shapes b16-64v-1000cls --out "$out/$prefix-tpt.json"
  step cocoop 60 $PY -m fastdpl.cli bench cocoop --device cuda --dtype bfloat16 --repeats 5 \
    --out "$out/$prefix-cocoop.json"
  step block 60 $PY -m fastdpl.cli bench block --device cuda --dtype bfloat16 --out "$out/$prefix-block.json"
elif [ "$mode" = rehearse ]; then  # each suite's own command line, as the GPU run calls them
  for level_name in step lm op vit tpt cocoop block; do
    step "$level_name" 300 $PY -m fastdpl.cli bench "$level_name" --device cpu --smoke --out "$out/$prefix-$level_name.json"
  done
else  # CI: the same runners and outputs in one process (fastdpl/bench/smoke.py)
  step suites 600 $PY -m fastdpl.bench.smoke "$out" "$prefix" step lm op vit tpt cocoop block
fi

# 5. the targets
step targets 30 $PY -m fastdpl.bench.targets "$out" "$prefix-"
log "done: status $status after $((SECONDS - started_all))s"
pack
exit $status
