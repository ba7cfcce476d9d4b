#!/usr/bin/env bash
# 2026-12-04 c, call 1: PDL launches of our kernels, the pool keeping freed memory, the logits
# cast kernel. All CUDA tests; e2e 128k x 16 HiP and dense, A/B HIP_PDL=0 and HIP_POOL_TRIM=1.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
L=$(mktemp -d); trap 'tar czf $OUT/logs.tgz -C $L .' EXIT
B=/tmp/b
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv >> $S
timeout 90 $B/cuda --test-threads 2 > $L/t_cuda.log 2>&1; echo "cuda rc=$? $(date +%T)" >> $S; grep -E "test result|panicked" -A2 $L/t_cuda.log | head -20 >> $S
timeout 60 $B/cuda_fused --test-threads 2 > $L/t_fused.log 2>&1; echo "cuda_fused rc=$?" >> $S; grep -E "test result|panicked" -A2 $L/t_fused.log | head >> $S
timeout 60 $B/cuda_offload --test-threads 2 > $L/t_offload.log 2>&1; echo "cuda_offload rc=$?" >> $S; grep -E "test result|panicked" $L/t_offload.log | head >> $S
timeout 60 $B/gpu --test-threads 1 > $L/t_gpu.log 2>&1; echo "gpu rc=$?" >> $S; grep -E "test result|panicked" $L/t_gpu.log | head >> $S
run() {  # name, method, then env
  local name=$1 m=$2; shift 2
  env "$@" timeout 100 $B/hip-bench e2e --fill --contexts 131072 --batch 16 --methods $m --decode 16 > $L/e2e_$name.log 2>&1
  echo "e2e $name rc=$? $(date +%T): $(grep -E '^\| hip-core' $L/e2e_$name.log | tr '\n' ' ')" >> $S
}
run hip_1 hip
run dense_1 dense
run hip_nopdl_1 hip HIP_PDL=0
run hip_trim_1 hip HIP_POOL_TRIM=1
run hip_2 hip
run dense_nopdl_1 dense HIP_PDL=0 HIP_POOL_TRIM=1
run hip_3 hip
