#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (benchmarks/gpu-machine/wheels.txt) into .whl/ at the
# repository root, for its Python 3.12 on x86-64 manylinux, and print their total size: the device
# tool carries at most 64 MiB per call (the working tree included).
#
#   benchmarks/fetch_wheels.sh [NAME==VERSION ...]     the list, plus any extra pins
#
# .whl/ is ignored by git (.gitignore); send it with the device call (carry: [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
mapfile -t pins < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' benchmarks/gpu-machine/wheels.txt | grep -v '^$')
pins+=("$@")
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_5_x86_64; do platforms+=(--platform "$p"); done
for pin in "${pins[@]}"; do
  name=${pin%%==*}
  # one version of each package in .whl/: two would stop the whole install there
  find .whl -maxdepth 1 -iname "$(echo "$name" | tr '-' '_')-*.whl" ! -iname "*-${pin##*==}-*" -delete
  PIP_CONFIG_FILE=/dev/null python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "$pin"
done
ls -l .whl/*.whl
total=$(du -cb .whl/*.whl | tail -n 1 | cut -f1)
echo "total: $((total / 1024)) KiB in $(ls .whl/*.whl | wc -l) wheels (limit 64 MiB per device call, with the tree)"
[ "$total" -lt $((48 * 1024 * 1024)) ] || { echo "too large: leave room for the working tree"; exit 1; }
