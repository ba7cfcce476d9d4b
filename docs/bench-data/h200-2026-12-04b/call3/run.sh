#!/usr/bin/env bash
# 2026-12-04 b, call 3: phase profile of the decode mask search (scripts/mask_profile.cu) at 128k x 16
# (Qwen2.5-1.5B heads) for the `_t`, `_o2p` and base forms; ncu of one `_t` launch (full set and
# per-SASS-instruction counters).
cd "$(dirname "$0")/.."
S=$OUT/summary.txt
M=gpu-b/mp/mask_profile
NCU=/usr/local/cuda/bin/ncu
for f in t o2p base; do timeout 60 $M 131072 16 12 2 $f >> $S 2>&1; done
timeout 60 $M 4096 16 12 2 t >> $S 2>&1
timeout 120 $NCU --clock-control none -k regex:hip_mask_few_bf16_d128_t --launch-skip 3 --launch-count 1 --set full \
  --import-source no --print-details all $M 131072 16 12 2 t > $OUT/ncu_t_full.txt 2>&1
echo "ncu full rc=$? $(date +%T)" >> $S
timeout 120 $NCU --clock-control none -k regex:hip_mask_few_bf16_d128_t --launch-skip 3 --launch-count 1 --section SourceCounters \
  --page source --print-source sass --csv $M 131072 16 12 2 t > $OUT/ncu_t_sass.csv 2>&1
echo "ncu sass rc=$? $(date +%T)" >> $S
gzip $OUT/ncu_t_full.txt $OUT/ncu_t_sass.csv
