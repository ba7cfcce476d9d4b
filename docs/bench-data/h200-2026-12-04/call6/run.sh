#!/usr/bin/env bash
# The clustered GQA span decode (span_decode_gqa_c8, default from 132 rows): CUDA tests by default
# and under each forced form, gpu tests, e2e 128k x 16 against p2, ncu durations at 4k x 16.
cd "$(dirname "$0")/.."
export HIP_BIN=/tmp/b
. scripts/gpu-unpack.sh gpu-b/bins.tar.xz || exit 1
S=$OUT/summary.txt
L=$(mktemp -d); trap 'tar czf $OUT/logs.tgz -C $L .' EXIT
B=/tmp/b
NCU=/usr/local/cuda/bin/ncu
timeout 200 $B/cuda --test-threads 2 > $L/t_cuda.log 2>&1; echo "cuda rc=$? $(date +%T)" >> $S; grep -E "test result|panicked|rel err" $L/t_cuda.log | head -20 >> $S
for f in gqa8 gqa p2; do
HIP_SPAN_DECODE=$f timeout 120 $B/cuda batched_hip decode_keeps block_sparse paged many_row --test-threads 2 > $L/t_cuda_$f.log 2>&1
echo "cuda HIP_SPAN_DECODE=$f rc=$? $(date +%T)" >> $S; grep -E "test result|panicked|rel err" $L/t_cuda_$f.log | head -10 >> $S
done
timeout 100 $B/gpu --test-threads 1 > $L/t_gpu.log 2>&1; echo "gpu rc=$?" >> $S; grep -E "test result|panicked" $L/t_gpu.log | head >> $S
run() {  # name, then env
  local name=$1; shift
  env "$@" timeout 90 $B/hip-bench e2e --fill --contexts 131072 --batch 16 --methods hip --decode 16 > $L/e2e_$name.log 2>&1
  echo "e2e $name rc=$?: $(grep -E '^\| hip-core' $L/e2e_$name.log | tr '\n' ' ')" >> $S
}
run c8_1
run p2_1 HIP_SPAN_DECODE=p2
run c8_2
run p2_2 HIP_SPAN_DECODE=p2
E="e2e --fill --contexts 4096 --batch 16 --methods hip --decode 2"
HIP_CUDA_PROFILE_TIMED=1 timeout 100 $NCU --clock-control none --cache-control none --profile-from-start off -k regex:'span_' \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum --print-summary per-kernel --csv $B/hip-bench $E > $OUT/ncu_c8.csv 2> $L/ncu_c8.err
echo "ncu c8 rc=$? $(date +%T)" >> $S
