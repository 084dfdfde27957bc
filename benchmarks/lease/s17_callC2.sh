#!/usr/bin/env bash
# Session 17, call C2 (right after C1, warm box): Q4_0 by llama-quantize (bench_peers --phase model), llama-bench
# -ngl 99 tg128 on the bf16 and Q4_0 GGUFs, then tiered's VRAM decode of q4+q4 and bf16 (TUNED as committed, the
# preload on) and q4+q4 without the preload, all in this call on a quiet box.
source "$(dirname "$0")/lib.sh"
timeout 200 python3 benchmarks/bench_peers.py --phase model --work $W --llama-bin /root/lb/bin > $OUT/model.log 2>&1
echo "model rc=$? $(el)"; tail -6 $OUT/model.log
cp $W/model.json $OUT/ 2>/dev/null; cp $W/*quant*.log $OUT/ 2>/dev/null
timeout 200 python3 benchmarks/bench_peers.py --phase llama --work $W --llama-bin /root/lb/bin \
  --llama-only gpu_bf16,gpu_q4_0 > $OUT/llama.log 2>&1
echo "llama rc=$? $(el)"; tail -6 $OUT/llama.log; cp $W/llama.json $OUT/ 2>/dev/null; pack
peers_vram q4 default; peers_vram bf16 default; peers_vram q4 nopre TIERED_PRELOAD=0
