#!/usr/bin/env bash
# Session 11, lease call C: why the mailbox worker read 33 GB/s in the device step (call B) when the load-time probe
# measured 50-65: its rate alone and beside the GPU's gather (bench_mailbox.py), with OpenMP's default wait policy
# and with OMP_WAIT_POLICY=active (a thread team that spins between jobs instead of sleeping); then the bf16
# offload's lru/device against lru+cpu/device with the active policy.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout source source; pack
for P in default active; do
  E=""; [ $P = active ] && E="OMP_WAIT_POLICY=active"
  env $E timeout 120 python3 benchmarks/bench_mailbox.py --layout $W/layout --threads 8,16 --experts 1,2,4 \
    > $OUT/mailbox-$P.log 2>&1
  echo "mailbox $P rc=$? $(el)"; grep '^{"threads' $OUT/mailbox-$P.log | cut -c1-220; tail -1 $OUT/mailbox-$P.log > $OUT/mailbox-$P.json; pack
done
OMP_WAIT_POLICY=active timeout 150 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --text .carry/shared/text \
  --docs 1 --paced "" --device-fill "" --only "lru/device,lru+cpu/device,nextuse+cpu/device" \
  > $OUT/offload-bf16-active.log 2>&1
echo "offload bf16 active rc=$? $(el)"; grep -E "^csv" $OUT/offload-bf16-active.log | tail -6
tail -1 $OUT/offload-bf16-active.log > $OUT/offload-bf16-active.json; pack
