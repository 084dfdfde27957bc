#!/usr/bin/env bash
# Session 25, call E: the prefill chunk (Engine.prefill_chunk, 512 until now): call C found a VRAM prefill
# host-bound (the kernels 15-17% of the wall, about 20 ms of host work per 512-token chunk of the 8-layer model), so
# fewer, longer chunks should gain. q4+q4 and bf16 10.6B 8-layer layouts in VRAM, 512 / 4000-token prompts, chunks
# 512 / 1024 / 2048 / 4096, warm rates (synchronised), then one profiled 4000-token run at chunk 4096.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
for v in q4 bf16; do
  lay=layout-q4; [ $v = bf16 ] && lay=layout
  timeout 120 python3 tools/profile_prefill.py -m $W/$lay --tokens 512,4000 --chunks 512,1024,2048,4096 --no-profile \
    --json > $OUT/chunks-$v.log 2>&1
  echo "chunks $v rc=$? $(el)"; grep -E "^==" $OUT/chunks-$v.log; mv $OUT/profile-prefill.json $OUT/chunks-$v.json; pack
done
timeout 90 python3 tools/profile_prefill.py -m $W/layout-q4 --tokens 4000 --chunks 4096 --top 16 > $OUT/profile-q4-4096.log 2>&1
echo "profile rc=$? $(el)"; grep -E "^==|^   " $OUT/profile-q4-4096.log | head -20; pack
