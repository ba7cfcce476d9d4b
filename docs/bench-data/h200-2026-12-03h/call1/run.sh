#!/usr/bin/env bash
# Session 2026-12-03 (night), call 1: opt-in forms (tests + 128k x 16 e2e), cuda_fused, kernel ranking (ncu 4k x 16 fused).
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
timeout 60 /tmp/b/cuda_fused --test-threads 2 > $OUT/t_fused.log 2>&1; echo "cuda_fused rc=$?" >> $S
grep -E "test result|panicked" $OUT/t_fused.log >> $S
HIP_BIN=/tmp/b bash scripts/h200/forms.sh
NCU=/usr/local/cuda/bin/ncu
HIP_CUDA_PROFILE_TIMED=1 timeout 150 $NCU --profile-from-start off --metrics gpu__time_duration.sum --print-summary per-kernel --csv \
  /tmp/b/hip-bench e2e --fill --contexts 4096 --batch 16 --methods hip --decode 4 > $OUT/ncu.csv 2> $OUT/ncu.err
echo "ncu rc=$?" >> $S; tail -3 $OUT/ncu.err >> $S; wc -l $OUT/ncu.csv >> $S
cd $OUT && tar czf logs.tgz --exclude=summary.txt --exclude=logs.tgz . && find . -type f ! -name summary.txt ! -name logs.tgz -delete
