#!/usr/bin/env bash
# Session 37, call B (not run in session 37: no device was lent; for the next session, after s36_callA.sh): the
# box's CPU through the native kernel after session 37's changes (IN_REG keeps the dots' x in registers: one
# token's q4 GEMV 1.3x faster on a Zen 4 core; the tiled GEMM and expert rows, which the one-token path does not
# use). tools/bench_cpu_experts.py's one-token expert rate per format (session 14: bf16 73.9 GB/s, q8 55.8, q4 about
# 17, why the default drops the CPU path for q4) at 15 and 8 threads, both shapes; then q4+q4 at --vram-gb 4 with
# the defaults and with --cpu-experts auto on the device step (does the probe now give the CPU a share of q4's
# misses, and does it pay).
source "$(dirname "$0")/lib.sh"
timeout 150 python3 tools/bench_cpu_experts.py --threads 15,8 --paths bf16,q8,q4 --pool-gb 4 \
  > $OUT/cpu-experts-10b.log 2>&1
echo "cpu experts 10.6B rc=$? $(el)"; grep threads $OUT/cpu-experts-10b.log | cut -c1-170; pack
timeout 120 python3 tools/bench_cpu_experts.py --hidden 4096 --ffn 1024 --k 10 --threads 15 --paths bf16,q4 \
  --pool-gb 4 > $OUT/cpu-experts-397b.log 2>&1
echo "cpu experts 397B rc=$? $(el)"; grep threads $OUT/cpu-experts-397b.log | cut -c1-170; pack
peers_ckpt; peers_layout layout-q4 q4 q4; pack
TIMEOUT=200 LAYOUT=layout-q4 offload_variant q4 "default,lru/device,lru+cpu/device"
