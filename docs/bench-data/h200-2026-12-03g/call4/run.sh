#!/usr/bin/env bash
# Call 4: the headline table at HEAD, and what the HiP step's attention parts cost at 128k x 16
# (diagnostics: no refresh in the timed steps; no dense layers).
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
timeout 60 /tmp/b/gpu --test-threads 1 > $OUT/test_gpu.log 2>&1; echo "test gpu rc=$?" >> $S
grep -E "^test |test result|panicked|rel err" $OUT/test_gpu.log | head -10 >> $S
B=/tmp/b/hip-bench
timeout 200 $B e2e --contexts 4096,131072 --batch 1,16 --methods dense,hip --decode 32 --json $OUT/e2e.jsonl > $OUT/e2e.log 2>&1
echo "e2e rc=$?" >> $S; grep -E "^\|" $OUT/e2e.log >> $S
for c in refresh=1000000 dense=none; do
timeout 60 $B e2e --fill --contexts 131072 --batch 16 --methods hip --decode 32 --hip-config $c > $OUT/diag_$c.log 2>&1
echo "diag $c rc=$?" >> $S; grep -E "^\| hip-core" $OUT/diag_$c.log >> $S
done
