#!/usr/bin/env bash
# Session 12, lease call H2 (right after H1, on the warm box): llama.cpp's `-ngl 99 -ot exps=CPU -t 16` llama-bench
# (pp512, tg128) on the peers model, alone on the box, then tiered's bf16 offload at --vram-gb 4 with replayed routing
# in the same call: lru/nextuse on the device step with and without CPU experts, and paced to 12 GB/s (issue 12:
# decode_vs_llamacpp_cpu_experts from this call's llama.json; paced_device_cpu_over_off).
source "$(dirname "$0")/lib.sh"
timeout 200 python3 benchmarks/bench_peers.py --phase llama --work $W --llama-bin /root/lb/bin \
  --llama-only cpu_experts_bf16 > $OUT/llama.log 2>&1
echo "llama rc=$? $(el)"; tail -4 $OUT/llama.log; cp $W/llama.json $OUT/ 2>/dev/null; pack
TIMEOUT=300 offload_variant h2 "lru/device,nextuse/device,lru+cpu/device,nextuse+cpu/device,lru/device@12,lru+cpu/device@12" \
  --llama-json $W/llama.json --paced "12"
