#!/usr/bin/env bash
# Session 38, call B (s37_callB.sh with session 38's q8 activation mode added, and the rest of call A's CUDA tests):
# the box's CPU through the native kernel; tools/bench_cpu_experts.py's one-token expert rate per path (bf16, q8, q4
# and q4@q8: TIERED_CPU_ACT=q8, q4 products from 8-bit inputs by integer dot products) at 15 threads; q4+q4 at
# --vram-gb 4 with the defaults and with --cpu-experts auto on the device step, in both activation modes (does the
# probe give the CPU a share of q4's misses, and does it pay); the 20 CUDA tests call A's 200 s did not reach
# (s38_cuda_rest.txt); last, the 397B shape's q4 rates.
source "$(dirname "$0")/lib.sh"
timeout 110 python3 tools/bench_cpu_experts.py --threads 15 --paths bf16,q8,q4,q4@q8 --pool-gb 4 --links 55,25,12 \
  > $OUT/cpu-experts-10b.log 2>&1
echo "cpu experts 10.6B rc=$? $(el)"; grep threads $OUT/cpu-experts-10b.log | cut -c1-170; pack
peers_ckpt; peers_layout layout-q4 q4 q4; pack
TIMEOUT=150 LAYOUT=layout-q4 offload_variant q4 "default,lru/device,lru+cpu/device"
TIERED_CPU_ACT=q8 TIMEOUT=80 LAYOUT=layout-q4 offload_variant q4-act8 "lru+cpu/device"
cuda_tests 100 $(cat benchmarks/lease/s38_cuda_rest.txt)
timeout 60 python3 tools/bench_cpu_experts.py --hidden 4096 --ffn 1024 --k 10 --threads 15 --paths q4,q4@q8 \
  --pool-gb 2 --links 55,25 > $OUT/cpu-experts-397b.log 2>&1
echo "cpu experts 397B rc=$? $(el)"; grep threads $OUT/cpu-experts-397b.log | cut -c1-170; pack
