#!/usr/bin/env bash
# On the H200 (device runner), from the repository root: the kernel forms of the HiP decode against
# the defaults. Correctness first (the CUDA tests under each form), then one e2e decode measurement
# per form at 128k x 16 (Qwen2.5-1.5B shapes, KV filled from random values), so that the fastest
# correct form can become the default. Expects the `make cuda` binaries unpacked with
# scripts/gpu-unpack.sh into $HIP_BIN (cuda, cuda_fused, gpu, hip-bench among them) and writes $OUT/summary.txt and
# $OUT/forms-logs.tgz.
#
#   HIP_BIN=/tmp/b bash scripts/h200/forms.sh   (FORMS_E2E=0: the tests alone, FORMS_TESTS=0: the e2e runs alone; SPAN_FORMS, MASK_FORMS,
#   E2E_MASK_FORMS, E2E_BATCH pick what runs; the span forms: hip-kernels/src/cuda/mod.rs)
set -u
B=${HIP_BIN:-/tmp/hip-bin}
S=${OUT:-/tmp}/summary.txt
O=$(mktemp -d)  # the logs, packed into $OUT/forms-logs.tgz at the end (the runner returns 8 files)
trap 'tar czf "${OUT:-/tmp}/forms-logs.tgz" -C "$O" .' EXIT
MASK_FORMS=${MASK_FORMS:-t o2p base}
SPAN_FORMS=${SPAN_FORMS:-gqa gqa2 p2}
if [[ ${FORMS_TESTS:-1} == 1 ]]; then
for f in $MASK_FORMS; do
  HIP_MASK_FEW=$f timeout 60 "$B"/cuda mask batched_hip decode_keeps --test-threads 2 >"$O/cuda_mask_$f.log" 2>&1
  echo "cuda (HIP_MASK_FEW=$f) rc=$?" >>"$S"; grep -E "test result|panicked" "$O/cuda_mask_$f.log" >>"$S"
done
for f in $SPAN_FORMS; do
  HIP_SPAN_DECODE=$f timeout 60 "$B"/cuda batched_hip decode_keeps block_sparse paged dense_matches many_row --test-threads 2 >"$O/cuda_span_$f.log" 2>&1
  echo "cuda (HIP_SPAN_DECODE=$f) rc=$?" >>"$S"; grep -E "test result|panicked" "$O/cuda_span_$f.log" >>"$S"
done
timeout 60 "$B"/gpu --test-threads 1 >"$O/gpu.log" 2>&1; echo "gpu rc=$?" >>"$S"
grep -E "test result|panicked" "$O/gpu.log" >>"$S"
# The few-row product (the default for decode steps; HIP_SMALL_MATMUL=0 cuBLAS, and HIP_PDL=0
# plain launches): its kernel test, and the model tests without it and without PDL.
timeout 60 "$B"/cuda_fused matmul_small >"$O/cuda_fused_matmul.log" 2>&1; echo "cuda_fused matmul_small rc=$?" >>"$S"
grep -E "test result|panicked" "$O/cuda_fused_matmul.log" >>"$S"
HIP_SMALL_MATMUL=0 timeout 60 "$B"/gpu --test-threads 1 >"$O/gpu_cublas.log" 2>&1; echo "gpu (HIP_SMALL_MATMUL=0) rc=$?" >>"$S"
grep -E "test result|panicked" "$O/gpu_cublas.log" >>"$S"
HIP_PDL=0 timeout 60 "$B"/gpu --test-threads 1 >"$O/gpu_nopdl.log" 2>&1; echo "gpu (HIP_PDL=0) rc=$?" >>"$S"
grep -E "test result|panicked" "$O/gpu_nopdl.log" >>"$S"
fi
[[ ${FORMS_E2E:-1} == 0 ]] && exit 0
run() {  # name, then env assignments
  local name=$1; shift
  env "$@" timeout 90 "$B"/hip-bench e2e --fill --contexts 131072 --batch ${E2E_BATCH:-16} --methods hip --decode 16 \
    >"$O/e2e_$name.log" 2>&1
  echo "e2e $name rc=$?: $(grep -E '^\| hip-core' "$O/e2e_$name.log" | tr '\n' ' ')" >>"$S"
}
run default
for f in $SPAN_FORMS; do run "span_$f" HIP_SPAN_DECODE=$f; done
# The two-stage GQA decode fits three CTAs a multiprocessor: splits of ~320 mask positions
# (10 for Qwen2.5-1.5B's groups: 320 CTAs at 16 sequences, one wave).
[[ " $SPAN_FORMS " == *" gqa2 "* ]] && run span_gqa2_split320 HIP_SPAN_DECODE=gqa2 HIP_GQA_SPLIT=${GQA2_SPLIT:-320}
for f in ${E2E_MASK_FORMS:-}; do run "mask_$f" HIP_MASK_FEW=$f; done
run cublas HIP_SMALL_MATMUL=0
run no_pdl HIP_PDL=0
run default_again
