#!/usr/bin/env bash
# 2026-12-04 c, call 6: another lease's e2e 128k x 16 HiP / dense pairs (commit's defaults).
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
L=$(mktemp -d); trap 'tar czf $OUT/logs.tgz -C $L .' EXIT
B=/tmp/b
run() {  # name, method, batch, then env
  local name=$1 m=$2 b=$3; shift 3
  env "$@" timeout 100 $B/hip-bench e2e --fill --contexts 131072 --batch $b --methods $m --decode 16 > $L/e2e_$name.log 2>&1
  echo "e2e $name rc=$? $(date +%T): $(grep -E '^\| hip-core' $L/e2e_$name.log | tr '\n' ' ')" >> $S
}
run dense_1 dense 16
run hip_1 hip 16
run dense_2 dense 16
run hip_2 hip 16
