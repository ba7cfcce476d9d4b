#!/usr/bin/env bash
# Call 4: small batches, span-decode forms alternated (noise), and a forward-phase profile at 128k x 16.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt; L=/tmp/logs4; mkdir -p $L
B=/tmp/b/hip-bench
for f in p8 auto k64 p8 auto k64; do
HIP_SPAN_DECODE=$f timeout 60 $B e2e --fill --contexts 131072 --batch 1,4 --methods hip --decode 64 > $L/e2e_small_$f.log 2>&1
echo "small batches form $f rc=$?" >> $S; grep -E "^\| hip-core" $L/e2e_small_$f.log >> $S
done
for pf in 2 1; do
HIP_PROFILE_FORWARD=$pf timeout 90 $B e2e --fill --contexts 131072 --batch 16 --methods hip --decode 56 > $L/prof$pf.log 2>&1
echo "prof $pf rc=$?" >> $S; grep -v "^|" $L/prof$pf.log | tail -12 >> $S; grep -E "^\| hip-core" $L/prof$pf.log >> $S
done
tar czf $OUT/logs.tgz -C $L .
