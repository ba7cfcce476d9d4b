#!/usr/bin/env bash
# 2026-12-04 b, call 4: the decode search keeps its best branches by a radix select fused with the
# next split (instead of a bitonic sort, then a split). Mask tests under forced forms and by default
# (new: exact ties), all cuda tests, offload, gpu; phase profile; e2e 128k x 16 three times.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
L=$(mktemp -d); trap 'tar czf $OUT/logs.tgz -C $L .' EXIT
B=/tmp/b
M=gpu-b/mp/mask_profile
for f in t o2p; do timeout 60 $M 131072 16 12 2 $f >> $S 2>&1; done
timeout 60 $M 4096 16 12 2 t >> $S 2>&1
timeout 100 $B/cuda --test-threads 2 > $L/t_cuda.log 2>&1; echo "cuda rc=$? $(date +%T)" >> $S; grep -E "test result|panicked" -A2 $L/t_cuda.log | head -20 >> $S
for f in t o2p base; do
  HIP_MASK_FEW=$f timeout 90 $B/cuda mask batched_hip decode_keeps many_row --test-threads 2 > $L/t_cuda_$f.log 2>&1
  echo "cuda HIP_MASK_FEW=$f rc=$? $(date +%T)" >> $S; grep -E "test result|panicked" -A2 $L/t_cuda_$f.log | head -20 >> $S
done
timeout 60 $B/cuda_offload --test-threads 2 > $L/t_offload.log 2>&1; echo "cuda_offload rc=$?" >> $S; grep -E "test result|panicked" $L/t_offload.log | head >> $S
timeout 60 $B/gpu --test-threads 1 > $L/t_gpu.log 2>&1; echo "gpu rc=$?" >> $S; grep -E "test result|panicked" $L/t_gpu.log | head >> $S
run() {  # name, then env
  local name=$1; shift
  env "$@" timeout 90 $B/hip-bench e2e --fill --contexts 131072 --batch 16 --methods hip --decode 16 > $L/e2e_$name.log 2>&1
  echo "e2e $name rc=$? $(date +%T): $(grep -E '^\| hip-core' $L/e2e_$name.log | tr '\n' ' ')" >> $S
}
run default_1
run default_2
run default_3
