#!/usr/bin/env bash
# Session 11, lease call D: the mailbox worker as one persistent thread team (no OpenMP fork and join per post;
# call C: one 9.4 MB expert took 254 us through a fresh parallel region, 4 experts a post ran at 62 GB/s, and an
# active OpenMP wait policy made it 5x slower). The CUDA tests of the mailbox; its rate alone and beside the
# gather at 15 and 16 threads; then the bf16 offload: lru/device, nextuse/device and both with CPU experts.
source "$(dirname "$0")/lib.sh"
timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_cpu_mailbox.py \
  > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -4; echo "tests done $(el)"; pack
peers_ckpt; peers_layout layout source source; pack
timeout 100 python3 benchmarks/bench_mailbox.py --layout $W/layout --threads 15,16 --experts 1,2,4 > $OUT/mailbox.log 2>&1
echo "mailbox rc=$? $(el)"; grep '^{"threads' $OUT/mailbox.log | cut -c1-160; tail -1 $OUT/mailbox.log > $OUT/mailbox.json; pack
timeout 220 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --text .carry/shared/text --docs 1 \
  --paced "" --device-fill "" --only "lru/device,nextuse/device,lru+cpu/device,nextuse+cpu/device" \
  > $OUT/offload-bf16.log 2>&1
echo "offload bf16 rc=$? $(el)"; grep -E "^csv" $OUT/offload-bf16.log | tail -6
tail -1 $OUT/offload-bf16.log > $OUT/offload-bf16.json; pack
