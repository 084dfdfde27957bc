#!/usr/bin/env bash
# Session 40, call A: the dense-row prefetch into L2 (PFD, kernels/cpu_kernel.c; 8 rows by default now) on the box's
# CPU. First tools/bench_cpu_experts.py's one-token rate of 8 experts of the 10.6B shape at 15 threads with the builds
# alternating (PFD 0 / 4 / 8 / 16; bf16 and q8 experts); then issue 12's demand run (bf16, --vram-gb 4, replayed
# routing, the defaults: the device slot table with --cpu-experts auto) in fresh processes, alternating the default
# build and TIERED_CPU_DEFINES=PFD=0 (session 39's kernel) while the call's time lasts: the serial Belady ratio.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout source source; pack
timeout 120 python3 tools/bench_cpu_experts.py --threads 15 --paths bf16,q8 --pool-gb 4 --repeats 8 --rounds 4 \
  --variant pfd0=PFD=0 --variant pfd4=PFD=4 --variant pfd8= --variant pfd16=PFD=16 > $OUT/cpu-experts-pfd.log 2>&1
echo "cpu experts rc=$? $(el)"; grep threads $OUT/cpu-experts-pfd.log; pack
for i in 1 2; do
  for v in pfd8 pfd0; do
    [ $(( $(date +%s) - T0 )) -lt 470 ] || break 2
    d=""; [ $v = pfd0 ] && d=PFD=0
    TIERED_CPU_DEFINES=$d TIMEOUT=120 offload_variant $v-$i "default" > /dev/null
    echo "$v-$i $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-bf16-$v-$i.json; pack
  done
done
