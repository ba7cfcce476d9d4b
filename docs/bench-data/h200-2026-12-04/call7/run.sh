#!/usr/bin/env bash
# Final: the GQA span decode (partials) as the default from 132 rows: CUDA tests by default and
# with the one-row p2 forced, gpu tests, e2e 128k x 16 against p2.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
L=$(mktemp -d); trap 'tar czf $OUT/logs.tgz -C $L .' EXIT
B=/tmp/b
timeout 70 $B/cuda --test-threads 2 > $L/t_cuda.log 2>&1; echo "cuda rc=$? $(date +%T)" >> $S; grep -E "test result|panicked|rel err" $L/t_cuda.log | head -20 >> $S
HIP_SPAN_DECODE=p2 timeout 30 $B/cuda batched_hip decode_keeps block_sparse paged many_row --test-threads 2 > $L/t_cuda_p2.log 2>&1
echo "cuda HIP_SPAN_DECODE=p2 rc=$? $(date +%T)" >> $S; grep -E "test result|panicked|rel err" $L/t_cuda_p2.log | head -10 >> $S
timeout 30 $B/gpu --test-threads 1 > $L/t_gpu.log 2>&1; echo "gpu rc=$?" >> $S; grep -E "test result|panicked" $L/t_gpu.log | head >> $S
run() {  # name, then env
  local name=$1; shift
  env "$@" timeout 45 $B/hip-bench e2e --fill --contexts 131072 --batch 16 --methods hip --decode 16 > $L/e2e_$name.log 2>&1
  echo "e2e $name rc=$?: $(grep -E '^\| hip-core' $L/e2e_$name.log | tr '\n' ' ')" >> $S
}
run gqa_1
run p2_1 HIP_SPAN_DECODE=p2
run gqa_2
