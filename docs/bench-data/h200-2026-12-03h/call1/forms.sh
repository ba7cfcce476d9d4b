#!/usr/bin/env bash
# On the H200 (device runner), from the repository root: the opt-in kernel forms of the HiP decode
# against the defaults. Correctness first (the CUDA tests under each form), then one e2e decode
# measurement per form at 128k x 16 (Qwen2.5-1.5B shapes, KV filled from random values), so that
# the fastest correct form can become the default. Expects the `make cuda` binaries unpacked with
# scripts/gpu-unpack.sh into $HIP_BIN (cuda, gpu, hip-bench among them) and writes $OUT/summary.txt.
#
#   HIP_BIN=/tmp/b bash scripts/h200/forms.sh
set -u
B=${HIP_BIN:-/tmp/hip-bin}
S=${OUT:-/tmp}/summary.txt
for f in o2 p o2p; do
  HIP_MASK_FEW=$f timeout 60 "$B"/cuda mask batched_hip decode_keeps --test-threads 2 >"${OUT:-/tmp}/cuda_mask_$f.log" 2>&1
  echo "cuda (HIP_MASK_FEW=$f) rc=$?" >>"$S"; grep -E "test result|panicked" "${OUT:-/tmp}/cuda_mask_$f.log" >>"$S"
done
for f in c4 k64; do
  HIP_SPAN_DECODE=$f timeout 60 "$B"/cuda batched_hip decode_keeps block_sparse paged --test-threads 2 >"${OUT:-/tmp}/cuda_span_$f.log" 2>&1
  echo "cuda (HIP_SPAN_DECODE=$f) rc=$?" >>"$S"; grep -E "test result|panicked" "${OUT:-/tmp}/cuda_span_$f.log" >>"$S"
done
timeout 60 "$B"/gpu --test-threads 1 >"${OUT:-/tmp}/gpu.log" 2>&1; echo "gpu rc=$?" >>"$S"
grep -E "test result|panicked" "${OUT:-/tmp}/gpu.log" >>"$S"
run() {  # name, then env assignments
  local name=$1; shift
  env "$@" timeout 60 "$B"/hip-bench e2e --fill --contexts 131072 --batch 16 --methods hip --decode 16 \
    >"${OUT:-/tmp}/e2e_$name.log" 2>&1
  echo "e2e $name rc=$?: $(grep -E '^\| hip-core' "${OUT:-/tmp}/e2e_$name.log")" >>"$S"
}
run default
run mask_o2 HIP_MASK_FEW=o2
run mask_p HIP_MASK_FEW=p
run mask_o2p HIP_MASK_FEW=o2p
run span_c4 HIP_SPAN_DECODE=c4
run span_k64 HIP_SPAN_DECODE=k64
run default_again
