#!/usr/bin/env bash
# Call 2: o2p mask search default, register-row add_rms_norm, span decode forms (pipelined p8/p4/p4w/p2).
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
timeout 60 /tmp/b/cuda_fused --test-threads 2 > $OUT/t_fused.log 2>&1; echo "cuda_fused rc=$?" >> $S
grep -E "test result|panicked" $OUT/t_fused.log >> $S
timeout 120 /tmp/b/cuda --test-threads 2 > $OUT/t_cuda.log 2>&1; echo "cuda (defaults) rc=$?" >> $S
grep -E "test result|panicked" $OUT/t_cuda.log >> $S
MASK_FORMS="base" SPAN_FORMS="k64 p8 p4 p4w p2" HIP_BIN=/tmp/b bash scripts/h200/forms.sh
cd $OUT && tar czf logs.tgz --exclude=summary.txt --exclude=logs.tgz . && find . -type f ! -name summary.txt ! -name logs.tgz -delete
