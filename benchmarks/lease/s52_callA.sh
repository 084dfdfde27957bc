#!/usr/bin/env bash
# Session 52, call A (a fresh box): llama.cpp built (llama_bg) beside the peers checkpoint and its three layouts
# (q4+q4, bf16, --experts q4 alone as layout-q4e); once the build is done, llama.cpp's `-ngl 99 -ot exps=CPU -t 16`
# on the bf16 GGUF alone (issue 12's baseline, for call B's offload runs), then the Gluon q4 GEMV against TUNED's
# word tile at the lm_head on this card (lib.sh's gluon_lm; timed only on an H100 so far), then tiered's VRAM
# decode of q4+q4 and bf16 once each. Call B follows on the same warm box.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
llama_bg
peers_layout layout-q4 q4 q4
peers_layout layout source source
peers_layout layout-q4e q4 source
wait $CONV; wait $BUILD; grep -E "built|rc=" $OUT/build.log | tail -2; echo "build done $(el)"; pack
timeout 200 python3 benchmarks/bench_peers.py --phase llama --work $W --llama-bin /root/lb/bin \
  --llama-only cpu_experts_bf16 > $OUT/llama.log 2>&1
echo "llama rc=$? $(el)"; tail -4 $OUT/llama.log; cp $W/llama.json $OUT/ 2>/dev/null; pack
gluon_lm 120  # call B takes its entry: GLUON_LM="$GL" bash benchmarks/lease/s52_callB.sh
peers_vram q4 a
peers_vram bf16 a
decode_table
