#!/usr/bin/env bash
# Session 2026-12-03 (evening), call 1: fused norm (test + e2e), kernel ranking with ncu.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
timeout 120 /tmp/b/cuda --test-threads 2 > $OUT/test_cuda.log 2>&1; echo "test cuda rc=$?" >> $S
grep -E "^test |test result|panicked" $OUT/test_cuda.log | head -20 >> $S
timeout 200 /tmp/b/gpu --test-threads 1 > $OUT/test_gpu.log 2>&1; echo "test gpu rc=$?" >> $S
grep -E "^test |test result|panicked" $OUT/test_gpu.log | head -10 >> $S
HIP_FUSED_NORM=1 timeout 200 /tmp/b/gpu --test-threads 1 --nocapture > $OUT/test_gpu_fused.log 2>&1; echo "test gpu fused rc=$?" >> $S
grep -E "^test |test result|panicked|bf16" $OUT/test_gpu_fused.log | head -10 >> $S
B=/tmp/b/hip-bench
for f in 0 1; do
HIP_FUSED_NORM=$f timeout 240 $B e2e --contexts 4096,131072 --batch 1,16 --methods dense,hip --decode 32 --json $OUT/e2e_f$f.jsonl > $OUT/e2e_f$f.log 2>&1
echo "e2e fused=$f rc=$?" >> $S; grep -E "^\|" $OUT/e2e_f$f.log >> $S
done
NCU=/usr/local/cuda/bin/ncu
HIP_CUDA_PROFILE_TIMED=1 timeout 200 $NCU --profile-from-start off --metrics gpu__time_duration.sum --print-summary per-kernel --csv \
  $B e2e --fill --contexts 4096 --batch 16 --methods hip --decode 4 > $OUT/ncu.csv 2> $OUT/ncu.err
echo "ncu rc=$?" >> $S; tail -3 $OUT/ncu.err >> $S; wc -l $OUT/ncu.csv >> $S
