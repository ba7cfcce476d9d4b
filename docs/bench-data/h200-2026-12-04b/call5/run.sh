#!/usr/bin/env bash
# 2026-12-04 b, call 5: the GQA decode merges its splits in the last CTA of each group (no
# span_combine launch; HIP_SPLIT_COMBINE=launch the former), the norm loads its weights with the
# row; the decode search's tie test fixed. All CUDA tests, the span/dense tests with the former
# merge, gpu; e2e 128k x 16 HiP and dense, both merges, alternated.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
L=$(mktemp -d); trap 'tar czf $OUT/logs.tgz -C $L .' EXIT
B=/tmp/b
timeout 100 $B/cuda --test-threads 2 > $L/t_cuda.log 2>&1; echo "cuda rc=$? $(date +%T)" >> $S; grep -E "test result|panicked" -A2 $L/t_cuda.log | head -20 >> $S
HIP_SPLIT_COMBINE=launch timeout 60 $B/cuda batched dense_matches many_row decode_keeps --test-threads 2 > $L/t_cuda_launch.log 2>&1
echo "cuda HIP_SPLIT_COMBINE=launch rc=$? $(date +%T)" >> $S; grep -E "test result|panicked" -A2 $L/t_cuda_launch.log | head -20 >> $S
HIP_MASK_FEW=t timeout 60 $B/cuda mask many_row --test-threads 2 > $L/t_cuda_t.log 2>&1
echo "cuda HIP_MASK_FEW=t rc=$? $(date +%T)" >> $S; grep -E "test result|panicked" -A2 $L/t_cuda_t.log | head -20 >> $S
timeout 60 $B/cuda_fused --test-threads 2 > $L/t_fused.log 2>&1; echo "cuda_fused rc=$?" >> $S; grep -E "test result|panicked" $L/t_fused.log | head >> $S
timeout 60 $B/cuda_offload --test-threads 2 > $L/t_offload.log 2>&1; echo "cuda_offload rc=$?" >> $S; grep -E "test result|panicked" $L/t_offload.log | head >> $S
timeout 60 $B/gpu --test-threads 1 > $L/t_gpu.log 2>&1; echo "gpu rc=$?" >> $S; grep -E "test result|panicked" $L/t_gpu.log | head >> $S
run() {  # name, method, then env
  local name=$1 m=$2; shift 2
  env "$@" timeout 100 $B/hip-bench e2e --fill --contexts 131072 --batch 16 --methods $m --decode 16 > $L/e2e_$name.log 2>&1
  echo "e2e $name rc=$? $(date +%T): $(grep -E '^\| hip-core' $L/e2e_$name.log | tr '\n' ' ')" >> $S
}
run hip_1 hip
run hip_launch_1 hip HIP_SPLIT_COMBINE=launch
run dense_1 dense
run hip_2 hip
run dense_launch_1 dense HIP_SPLIT_COMBINE=launch
run hip_3 hip
