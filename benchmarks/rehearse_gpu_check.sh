#!/usr/bin/env bash
# Rehearse, on this CPU machine, what benchmarks/gpu_check.sh does on the GPU machine, so that a
# session's few minutes of device time are not spent on an import error or a missing wheel.
#
#   benchmarks/rehearse_gpu_check.sh [OUT_DIR]        (default bench-out/rehearsal)
#
# 1. A venv that stands in for the GPU machine's image: Python 3.12 with the packages of
#    benchmarks/gpu-machine/machine.txt and nothing else (torch 2.11.0, triton 3.6.0,
#    transformers 5.17.0, ...). Built once with the network (the image is given, not built, there)
#    in $FASTDPL_REHEARSAL_VENV (default ~/.cache/fastdpl/gpu-machine-venv) and kept pristine.
# 2. The wheels to carry: benchmarks/fetch_wheels.sh into .whl/, as before a device call.
# 3. The working tree as the device tool sends it (git's tracked and untracked-not-ignored files,
#    and .whl/) copied to a temporary folder, with $OUT an empty folder beside it.
# 4. There, without the network (a network namespace with no interface, `unshare -n`, where this
#    machine allows it; PIP_NO_INDEX=1 in any case) and with the venv's python3 first on PATH, the
#    device command itself: gpu_check.sh --rehearse --archive $OUT/gpu-check.tar.gz (the wheels
#    installed into a --target folder and fastdpl in editable mode, both without an index, exactly
#    as on the GPU; then the environment record, the kernel tests collected, the compiled-code
#    check, every benchmark suite at smoke sizes and the targets).
# 5. The archive unpacked into OUT_DIR; fastdpl uninstalled from the venv again.
# Exit status: gpu_check.sh's (0 when every step passed).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$root/bench-out/rehearsal}" && cd "${1:-$root/bench-out/rehearsal}" && pwd)
venv=${FASTDPL_REHEARSAL_VENV:-$HOME/.cache/fastdpl/gpu-machine-venv}
say() { echo "[rehearsal $(date +%H:%M:%S)] $*"; }

find_python312() {
  for candidate in "${FASTDPL_REHEARSAL_PYTHON:-}" python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 \
      && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$candidate"; return; }
  done
  echo "no Python 3.12 found (the GPU machine's): set FASTDPL_REHEARSAL_PYTHON" >&2; return 1
}

# 1. the stand-in for the GPU machine's image
if [ ! -x "$venv/bin/python3" ]; then
  say "building the GPU machine's stand-in venv at $venv (once; needs the network)"
  "$(find_python312)" -m venv "$venv"
  PIP_CONFIG_FILE=/dev/null "$venv/bin/python3" -m pip install -q --upgrade pip
  PIP_CONFIG_FILE=/dev/null "$venv/bin/python3" -m pip install -q -r "$root/benchmarks/gpu-machine/machine.txt"
fi
"$venv/bin/python3" -m pip uninstall -q -y fastdpl >/dev/null 2>&1 || true  # pristine: the image has no fastdpl
"$venv/bin/python3" -c "import torch, triton, transformers; print('stand-in:', 'torch', torch.__version__, \
'triton', triton.__version__, 'transformers', transformers.__version__)"

# 2. the wheels a device call carries
(cd "$root" && bash benchmarks/fetch_wheels.sh | tail -n 1)

# 3. the tree as the device tool sends it
work=$(mktemp -d "${TMPDIR:-/tmp}/fastdpl-rehearsal.XXXXXX")
trap '"$venv/bin/python3" -m pip uninstall -q -y fastdpl >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
mkdir -p "$work/repo" "$work/out" "$work/site"
(cd "$root" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work/repo" && cp -r .whl "$work/repo/")
size=$(du -sb "$work/repo" | cut -f1)
say "tree sent: $((size / 1024)) KiB (device limit 64 MiB)"
[ "$size" -lt $((64 * 1024 * 1024)) ] || { say "the tree is over the device tool's 64 MiB"; exit 1; }

# 4. the device command, offline
offline=()
if unshare -n true 2>/dev/null; then offline=(unshare -n); say "no network: unshare -n"; else
  say "unshare -n is not allowed here: PIP_NO_INDEX=1 only"; fi
set +e
(cd "$work/repo" && env -u PYTHONPATH -u TRITON_INTERPRET -u VIRTUAL_ENV PATH="$venv/bin:$PATH" PIP_NO_INDEX=1 \
  PIP_CONFIG_FILE=/dev/null FASTDPL_SITE="$work/site" OUT="$work/out" "${offline[@]}" \
  bash benchmarks/gpu_check.sh --rehearse --archive "$work/out/gpu-check.tar.gz" "$work/repo/bench-out/gpu-check")
status=$?
set -e

# 5. what would come back
tar xzf "$work/out/gpu-check.tar.gz" -C "$out"
say "status $status; results in $out ($(ls "$out" | wc -l) files, from one archive of $(du -k "$work/out/gpu-check.tar.gz" | cut -f1) KiB)"
exit $status
