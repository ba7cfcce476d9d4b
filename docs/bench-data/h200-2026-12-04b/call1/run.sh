#!/usr/bin/env bash
# 2026-12-04 b, call 1: the review commit e910002 under test (forms.sh: CUDA tests per span form,
# gpu, few-row products), e2e per form at 128k x 16; then the dense engine and HiP with every
# layer sparse (the paper's e2e estimate's setting) in the same lease.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
date +%T >> $S
bash scripts/h200/forms.sh
L=$(mktemp -d); trap 'tar czf $OUT/logs2.tgz -C $L .' EXIT
B=/tmp/b
run() {  # name, method, then env
  local name=$1 m=$2; shift 2
  env "$@" timeout 120 $B/hip-bench e2e --fill --contexts 131072 --batch 16 --methods $m --decode 16 ${XARGS:-} > $L/e2e_$name.log 2>&1
  echo "e2e $name rc=$? $(date +%T): $(grep -E '^\| hip-core' $L/e2e_$name.log | tr '\n' ' ')" >> $S
}
run dense dense
XARGS="--hip-config dense=none" run hip_allsparse hip
run hip_default hip
date +%T >> $S
