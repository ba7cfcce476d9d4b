#!/usr/bin/env bash
# 2026-12-04 c, call 4: SwiGLU's gate fused into the gate/up product (matmul_small_glu): cuda_fused,
# gpu; e2e 128k x 16 HiP and dense alternated (defaults: PDL, few-row products, fused gate);
# HiP with HIP_FUSED=0 left out (it also drops the other fused kernels); batch 1.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
L=$(mktemp -d); trap 'tar czf $OUT/logs.tgz -C $L .' EXIT
B=/tmp/b
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv >> $S
timeout 90 $B/cuda_fused --test-threads 2 > $L/t_fused.log 2>&1; echo "cuda_fused rc=$? $(date +%T)" >> $S; grep -E "test result|panicked" -A3 $L/t_fused.log | head >> $S
timeout 60 $B/gpu --test-threads 1 > $L/t_gpu.log 2>&1; echo "gpu rc=$? $(date +%T)" >> $S; grep -E "test result|panicked" -A3 $L/t_gpu.log | head >> $S
run() {  # name, method, batch, then env
  local name=$1 m=$2 b=$3; shift 3
  env "$@" timeout 100 $B/hip-bench e2e --fill --contexts 131072 --batch $b --methods $m --decode 16 > $L/e2e_$name.log 2>&1
  echo "e2e $name rc=$? $(date +%T): $(grep -E '^\| hip-core' $L/e2e_$name.log | tr '\n' ' ')" >> $S
}
run hip_1 hip 16
run dense_1 dense 16
run hip_2 hip 16
run dense_2 dense 16
run hip_3 hip 16
run hip_b1 hip 1
run dense_b1 dense 1
