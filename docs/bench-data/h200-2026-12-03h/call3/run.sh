#!/usr/bin/env bash
# Call 3: auto span-decode form (p2 / p4w / k64 by rows), o2p falls back without placement when too wide;
# all CUDA tests; batch 1 and 4 forms at 128k; the e2e table; diagnostics.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt; L=/tmp/logs; mkdir -p $L
for t in cuda cuda_fused cuda_offload; do
timeout 120 /tmp/b/$t --test-threads 2 > $L/t_$t.log 2>&1; echo "$t rc=$?" >> $S
grep -E "test result|panicked" -A2 $L/t_$t.log >> $S
done
timeout 60 /tmp/b/gpu --test-threads 1 > $L/t_gpu.log 2>&1; echo "gpu rc=$?" >> $S; grep -E "test result|panicked" $L/t_gpu.log >> $S
B=/tmp/b/hip-bench
for f in auto base k64 p8 p4w; do
HIP_SPAN_DECODE=$f timeout 60 $B e2e --fill --contexts 131072 --batch 1,4 --methods hip --decode 32 > $L/e2e_small_$f.log 2>&1
echo "small batches form $f rc=$?" >> $S; grep -E "^\| hip-core" $L/e2e_small_$f.log >> $S
done
timeout 300 $B e2e --contexts 4096,131072 --batch 1,16 --methods dense,hip --decode 32 --json $OUT/e2e.jsonl > $OUT/e2e.log 2>&1
echo "e2e rc=$?" >> $S; grep -E "^\|" $OUT/e2e.log >> $S
for c in refresh=1000000 dense=none; do
timeout 60 $B e2e --fill --contexts 131072 --batch 16 --methods hip --decode 32 --hip-config $c > $L/diag_$c.log 2>&1
echo "diag $c rc=$?" >> $S; grep -E "^\| hip-core" $L/diag_$c.log >> $S
done
tar czf $OUT/logs.tgz -C $L .
