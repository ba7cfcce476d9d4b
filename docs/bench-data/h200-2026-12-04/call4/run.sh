#!/usr/bin/env bash
# ncu durations at 4k x 16 HiP (the span decode reads the same keys as at 128k): the GQA span
# decode (default) and the p2 form.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
[[ -x /tmp/b/hip-bench ]] || { . scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1; }
S=$OUT/summary.txt
NCU=/usr/local/cuda/bin/ncu
E="e2e --fill --contexts 4096 --batch 16 --methods hip --decode 2"
for f in gqa p2; do
HIP_SPAN_DECODE=$f HIP_CUDA_PROFILE_TIMED=1 timeout 100 $NCU --clock-control none --cache-control none --profile-from-start off -k regex:'span_|dense_decode' \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum --print-summary per-kernel --csv /tmp/b/hip-bench $E > $OUT/ncu_$f.csv 2> $OUT/ncu_$f.err
echo "ncu $f rc=$? $(date +%T)" >> $S
done
