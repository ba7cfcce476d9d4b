#!/usr/bin/env bash
# 4k x 16 HiP (the span decode reads the same ~784 keys a row as at 128k): the span decode in detail
# (full section set), then per-kernel durations of 2 timed steps.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
[[ -x /tmp/b/hip-bench ]] || { . scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1; }
S=$OUT/summary.txt
B=/tmp/b/hip-bench
NCU=/usr/local/cuda/bin/ncu
E="e2e --fill --contexts 4096 --batch 16 --methods hip --decode 2"
HIP_CUDA_PROFILE_TIMED=1 timeout 150 $NCU --clock-control none --profile-from-start off -k regex:span_decode_bf16_d128_p2 --launch-skip 3 --launch-count 1 \
  --set full --import-source no --print-details all $B $E > $OUT/ncu_span_full.txt 2>&1
echo "ncu span rc=$? $(date +%T)" >> $S
[[ ${SUM:-0} == 1 ]] && HIP_CUDA_PROFILE_TIMED=1 timeout 150 $NCU --clock-control none --cache-control none --profile-from-start off \
  --metrics gpu__time_duration.sum --print-summary per-kernel --csv $B $E > $OUT/ncu_sum.csv 2> $OUT/ncu_sum.err
echo "ncu sum rc=$? $(date +%T)" >> $S; tail -3 $OUT/ncu_sum.err >> $S
HIP_CUDA_PROFILE_TIMED=1 timeout 150 $NCU --clock-control none --profile-from-start off -k regex:hip_mask_few_bf16_d128_o2p --launch-skip 3 --launch-count 1 \
  --set full --import-source no --print-details all $B $E > $OUT/ncu_mask_full.txt 2>&1
echo "ncu mask rc=$? $(date +%T)" >> $S
