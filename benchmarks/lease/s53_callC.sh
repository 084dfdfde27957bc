#!/usr/bin/env bash
# Session 53, call C (about 480 s, on call B's warm box: its checkpoint and bf16 layout under /root/peers): issue 12's
# same-run baseline at HEAD with --embed auto the default. llama.cpp built (llama_bg) with its bf16 GGUF, then its
# `-ngl 99 -ot exps=CPU -t 16` (bench_peers --phase llama --llama-only cpu_experts_bf16), then the offload (bf16,
# --vram-gb 4, one eval document's replayed routing) with every option at its default and lru+cpu/device, given
# llama.cpp's figure (decode_vs_llamacpp_cpu_experts); then the same with --embed gpu while time is left.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
llama_bg
peers_layout layout source source
wait $CONV; wait $BUILD; grep -E "built|rc=" $OUT/build.log | tail -2; echo "build done $(el)"; pack
timeout 150 python3 benchmarks/bench_peers.py --phase llama --work $W --llama-bin /root/lb/bin \
  --llama-only cpu_experts_bf16 > $OUT/llama.log 2>&1
echo "llama rc=$? $(el)"; tail -4 $OUT/llama.log; cp $W/llama.json $OUT/ 2>/dev/null; pack
TIMEOUT=100 offload_variant llama-auto "default,lru+cpu/device" --llama-json $W/llama.json
[ $(( $(date +%s) - T0 )) -lt 420 ] && TIMEOUT=80 offload_variant llama-gpu "default,lru+cpu/device" \
  --llama-json $W/llama.json --embed gpu
true
