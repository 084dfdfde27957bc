#!/usr/bin/env bash
# Session 11, lease call B: after call A (the CPU experts' split ran, +13% for lru, but the worker read only 31 GB/s):
# the CUDA tests of the mailbox in fp32 (call A compared bf16 tokens, which the CPU's summation order may flip);
# the mailbox's rate alone and beside the GPU's gather, by threads and experts per post (bench_mailbox.py); the
# bf16 offload again with the worker's figures in the JSON, at the default threads and at 16.
source "$(dirname "$0")/lib.sh"
timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_cpu_mailbox.py \
  > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -8; echo "tests done $(el)"; pack
nproc; lscpu | grep -E "^CPU\(s\)|Thread|Core|Socket|NUMA|Model name" ; pack
peers_ckpt; peers_layout layout source source; pack
timeout 150 python3 benchmarks/bench_mailbox.py --layout $W/layout --threads 8,16 --experts 1,2,4 > $OUT/mailbox.log 2>&1
echo "mailbox rc=$? $(el)"; grep -v '^{"bench' $OUT/mailbox.log | grep '^{' | cut -c1-200; pack
for T in 0 16; do
  timeout 200 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --text .carry/shared/text --docs 1 \
    --paced "" --device-fill "" --cpu-threads $T --only "lru/device,lru+cpu/device,nextuse+cpu/device" \
    > $OUT/offload-bf16-t$T.log 2>&1
  echo "offload bf16 threads $T rc=$? $(el)"; grep -E "^csv" $OUT/offload-bf16-t$T.log | tail -6
  tail -1 $OUT/offload-bf16-t$T.log > $OUT/offload-bf16-t$T.json; pack
done
