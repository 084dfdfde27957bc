#!/usr/bin/env bash
# Session 51, call B (after call A on the same warm box, whose checkpoint and layouts it reuses; on a cold box it
# makes them beside the build): issue 13's same-run llama.cpp baseline at HEAD on whatever card call A got.
# llama.cpp built here, its bf16 GGUF, Q4_0 by llama-quantize (bench_peers --phase model); tiered's VRAM decode
# (q4+q4, bf16) before and after llama-bench tg128 / pp512 on the bf16 and Q4_0 GGUFs; bench_peers --phase report
# writes the ratios (q4_vs_llamacpp_q4_0, q4_vs_bf16_decode).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
llama_bg
peers_layout layout-q4 q4 q4
peers_layout layout source source
wait $CONV; wait $BUILD; grep -E "built|rc=" $OUT/build.log | tail -2; echo "build done $(el)"; pack
timeout 120 python3 benchmarks/bench_peers.py --phase model --work $W --llama-bin /root/lb/bin > $OUT/model.log 2>&1
echo "model rc=$? $(el)"; tail -3 $OUT/model.log; cp $W/model.json $OUT/ 2>/dev/null; pack
peers_vram q4 a
peers_vram bf16 a
timeout 120 python3 benchmarks/bench_peers.py --phase llama --work $W --llama-bin /root/lb/bin \
  --llama-only gpu_bf16,gpu_q4_0 > $OUT/llama.log 2>&1
echo "llama rc=$? $(el)"; tail -4 $OUT/llama.log; cp $W/llama.json $OUT/ 2>/dev/null; pack
peers_vram q4 b
peers_vram bf16 b
decode_table
timeout 60 python3 benchmarks/bench_peers.py --phase report --work $W --results-dir $OUT > $OUT/report.log 2>&1
echo "report rc=$? $(el)"; grep -v '^{' $OUT/report.log | tail -25; pack
