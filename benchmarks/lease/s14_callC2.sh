#!/usr/bin/env bash
# Session 14, call C2 (right after C1, on the warm box): llama.cpp's `-ngl 99 -ot exps=CPU -t 16` llama-bench on the
# peers model alone, then tiered's bf16 offload at --vram-gb 4 with replayed routing in the same call: every option
# at its default (--cpu-experts unset: auto with the device slot table), explicit lru/device (off) and
# lru+cpu/device (auto), native and paced to 12 GB/s; then q4+q4 the same way (default against lru/device), in fresh
# processes.
source "$(dirname "$0")/lib.sh"
timeout 200 python3 benchmarks/bench_peers.py --phase llama --work $W --llama-bin /root/lb/bin \
  --llama-only cpu_experts_bf16 > $OUT/llama.log 2>&1
echo "llama rc=$? $(el)"; tail -4 $OUT/llama.log; cp $W/llama.json $OUT/ 2>/dev/null; pack
offload_variant default "default,lru/device,lru+cpu/device" --llama-json $W/llama.json
TIMEOUT=300 offload_variant paced "default@12,lru/device@12" --llama-json $W/llama.json --paced "12"
LAYOUT=layout-q4 offload_variant default "default,lru/device"
LAYOUT=layout-q4 offload_variant default2 "lru/device,default"
