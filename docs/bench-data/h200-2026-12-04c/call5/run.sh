#!/usr/bin/env bash
# 2026-12-04 c, call 5: the gpu test (fresh random weights each run) four times with its greedy
# picks printed, near ties counted as agreeing (same_pick).
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
L=$(mktemp -d); trap 'tar czf $OUT/logs.tgz -C $L .' EXIT
B=/tmp/b
for r in 1 2 3 4; do
  timeout 60 $B/gpu --test-threads 1 --nocapture > $L/t_gpu_$r.log 2>&1; echo "gpu run $r rc=$? $(date +%T)" >> $S; grep -E "test result|panicked" -A1 $L/t_gpu_$r.log | head -4 >> $S
done
