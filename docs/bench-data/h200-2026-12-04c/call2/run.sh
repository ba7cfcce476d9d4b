#!/usr/bin/env bash
# 2026-12-04 c, call 2: with PDL on, our few-row products (PDL-launched) against cuBLAS, by the
# largest weight that takes them (HIP_SMALL_MATMUL: 4 = q/k/v and o, 14 = + down, 30 = + gate/up,
# 1 = + LM head); the gpu test under HIP_SMALL_MATMUL=1; gqa2 once.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
L=$(mktemp -d); trap 'tar czf $OUT/logs.tgz -C $L .' EXIT
B=/tmp/b
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv >> $S
HIP_SMALL_MATMUL=1 timeout 60 $B/gpu --test-threads 1 > $L/t_gpu_small.log 2>&1; echo "gpu HIP_SMALL_MATMUL=1 rc=$?" >> $S; grep -E "test result|panicked" -A3 $L/t_gpu_small.log | head >> $S
run() {  # name, method, then env
  local name=$1 m=$2; shift 2
  env "$@" timeout 100 $B/hip-bench e2e --fill --contexts 131072 --batch 16 --methods $m --decode 16 > $L/e2e_$name.log 2>&1
  echo "e2e $name rc=$? $(date +%T): $(grep -E '^\| hip-core' $L/e2e_$name.log | tr '\n' ' ')" >> $S
}
run hip_1 hip
run hip_small4 hip HIP_SMALL_MATMUL=4
run hip_small14 hip HIP_SMALL_MATMUL=14
run dense_1 dense
run hip_small30 hip HIP_SMALL_MATMUL=30
run hip_small1 hip HIP_SMALL_MATMUL=1
run hip_gqa2 hip HIP_SPAN_DECODE=gqa2
run hip_2 hip
