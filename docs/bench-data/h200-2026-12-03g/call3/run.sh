#!/usr/bin/env bash
# Call 3: a single decode token also goes the batched / fused way; phase split; attention kernels at 128k.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
timeout 100 /tmp/b/gpu --test-threads 1 > $OUT/test_gpu.log 2>&1; echo "test gpu rc=$?" >> $S
grep -E "^test |test result|panicked|rel err" $OUT/test_gpu.log | head -10 >> $S
timeout 150 /tmp/b/gpu_offload --test-threads 1 > $OUT/test_gpu_offload.log 2>&1; echo "test gpu_offload rc=$?" >> $S
grep -E "^test |test result|panicked" $OUT/test_gpu_offload.log | head -10 >> $S
B=/tmp/b/hip-bench
timeout 150 $B e2e --fill --contexts 131072 --batch 1,16 --methods dense,hip --decode 32 --json $OUT/e2e.jsonl > $OUT/e2e.log 2>&1
echo "e2e rc=$?" >> $S; grep -E "^\|" $OUT/e2e.log >> $S
HIP_PROFILE_FORWARD=1 timeout 120 $B e2e --fill --contexts 131072 --batch 16 --methods dense,hip --decode 16 > $OUT/prof1.log 2>&1
echo "profile 1 rc=$?" >> $S; grep -E "forward profile|^\| hip-core" $OUT/prof1.log | tail -6 >> $S
NCU=/usr/local/cuda/bin/ncu
HIP_CUDA_PROFILE_TIMED=1 timeout 170 $NCU --profile-from-start off --cache-control none --kernel-name regex:"span_|hip_mask|dense_decode" --metrics gpu__time_duration.sum --print-summary per-kernel --csv \
  $B e2e --fill --contexts 131072 --batch 16 --methods hip --decode 8 > $OUT/ncu.csv 2> $OUT/ncu.err
echo "ncu rc=$?" >> $S; tail -3 $OUT/ncu.err >> $S; wc -l $OUT/ncu.csv >> $S
