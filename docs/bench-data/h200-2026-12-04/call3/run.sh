#!/usr/bin/env bash
# The GQA span decode (span_decode_gqa: a CTA per KV head and split, the group's rows on tensor
# cores): CUDA tests with it (default) and the 128k x 16 e2e against the one-row p2 form.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
B=/tmp/b
timeout 240 $B/cuda --test-threads 2 > $OUT/t_cuda.log 2>&1; echo "cuda rc=$? $(date +%T)" >> $S; grep -E "test result|panicked|rel err" $OUT/t_cuda.log | head -20 >> $S
timeout 100 $B/gpu --test-threads 1 > $OUT/t_gpu.log 2>&1; echo "gpu rc=$?" >> $S; grep -E "test result|panicked" $OUT/t_gpu.log | head >> $S
run() {  # name, then env
  local name=$1; shift
  env "$@" timeout 90 $B/hip-bench e2e --fill --contexts 131072 --batch 16 --methods hip --decode 16 > $OUT/e2e_$name.log 2>&1
  echo "e2e $name rc=$?: $(grep -E '^\| hip-core' $OUT/e2e_$name.log | tr '\n' ' ')" >> $S
}
run gqa_1
run p2_1 HIP_SPAN_DECODE=p2
run gqa_2
run p2_2 HIP_SPAN_DECODE=p2
