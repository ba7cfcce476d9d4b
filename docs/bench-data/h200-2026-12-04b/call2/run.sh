#!/usr/bin/env bash
# 2026-12-04 b, call 2: the decode mask search scoring on the tensor cores (`_t`, the new default):
# mask tests under each forced form (every row count), offload (the staging fallback), gpu;
# e2e 128k x 16 `_t` against `_o2p`, alternated.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
L=$(mktemp -d); trap 'tar czf $OUT/logs.tgz -C $L .' EXIT
B=/tmp/b
for f in t o2p; do
  HIP_MASK_FEW=$f timeout 90 $B/cuda mask batched_hip decode_keeps many_row paged --test-threads 2 > $L/t_cuda_$f.log 2>&1
  echo "cuda HIP_MASK_FEW=$f rc=$? $(date +%T)" >> $S; grep -E "test result|panicked|overlap 0\.[0-8]" $L/t_cuda_$f.log | head -20 >> $S
done
timeout 60 $B/cuda_offload --test-threads 2 > $L/t_offload.log 2>&1; echo "cuda_offload rc=$?" >> $S; grep -E "test result|panicked" $L/t_offload.log | head >> $S
timeout 60 $B/gpu --test-threads 1 > $L/t_gpu.log 2>&1; echo "gpu rc=$?" >> $S; grep -E "test result|panicked" $L/t_gpu.log | head >> $S
timeout 90 $B/gpu_offload --test-threads 1 > $L/t_gpu_offload.log 2>&1; echo "gpu_offload rc=$?" >> $S; grep -E "test result|panicked" $L/t_gpu_offload.log | head >> $S
run() {  # name, then env
  local name=$1; shift
  env "$@" timeout 90 $B/hip-bench e2e --fill --contexts 131072 --batch 16 --methods hip --decode 16 > $L/e2e_$name.log 2>&1
  echo "e2e $name rc=$? $(date +%T): $(grep -E '^\| hip-core' $L/e2e_$name.log | tr '\n' ' ')" >> $S
}
run t_1
run o2p_1 HIP_MASK_FEW=o2p
run t_2
run o2p_2 HIP_MASK_FEW=o2p
