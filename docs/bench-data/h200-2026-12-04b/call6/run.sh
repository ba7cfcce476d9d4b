#!/usr/bin/env bash
# 2026-12-04 b, call 6: batch 1 (host-bound steps), 128k: the split merge in the decode launch
# against HIP_SPLIT_COMBINE=launch, alternated.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
L=$(mktemp -d); trap 'tar czf $OUT/logs.tgz -C $L .' EXIT
B=/tmp/b
run() {  # name, method, then env
  local name=$1 m=$2; shift 2
  env "$@" timeout 60 $B/hip-bench e2e --fill --contexts 131072 --batch 1 --methods $m --decode 32 > $L/e2e_$name.log 2>&1
  echo "e2e $name rc=$? $(date +%T): $(grep -E '^\| hip-core' $L/e2e_$name.log | tr '\n' ' ')" >> $S
}
run hip_1 hip
run hip_launch_1 hip HIP_SPLIT_COMBINE=launch
run hip_2 hip
run hip_launch_2 hip HIP_SPLIT_COMBINE=launch
