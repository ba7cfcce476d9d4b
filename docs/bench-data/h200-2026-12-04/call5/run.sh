#!/usr/bin/env bash
# The GQA span decode with its placement in two rounds of loads: CUDA tests, ncu durations at
# 4k x 16 per split size, e2e 128k x 16 against p2.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
B=/tmp/b
NCU=/usr/local/cuda/bin/ncu
timeout 200 $B/cuda --test-threads 2 > $OUT/t_cuda.log 2>&1; echo "cuda rc=$? $(date +%T)" >> $S; grep -E "test result|panicked|rel err" $OUT/t_cuda.log | head -20 >> $S
E="e2e --fill --contexts 4096 --batch 16 --methods hip --decode 2"
for sp in 448 224; do
HIP_GQA_SPLIT=$sp HIP_CUDA_PROFILE_TIMED=1 timeout 100 $NCU --clock-control none --cache-control none --profile-from-start off -k regex:'span_' \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum --print-summary per-kernel --csv $B/hip-bench $E > $OUT/ncu_$sp.csv 2> $OUT/ncu_$sp.err
echo "ncu $sp rc=$? $(date +%T)" >> $S
done
run() {  # name, then env
  local name=$1; shift
  env "$@" timeout 90 $B/hip-bench e2e --fill --contexts 131072 --batch 16 --methods hip --decode 16 > $OUT/e2e_$name.log 2>&1
  echo "e2e $name rc=$?: $(grep -E '^\| hip-core' $OUT/e2e_$name.log | tr '\n' ' ')" >> $S
}
run gqa_1
run p2_1 HIP_SPAN_DECODE=p2
run gqa224_1 HIP_GQA_SPLIT=224
run gqa_2
run p2_2 HIP_SPAN_DECODE=p2
run gqa224_2 HIP_GQA_SPLIT=224
