#!/usr/bin/env bash
# Session 25, call C: call B's prefill profiles again with prompts inside the random model's limit (4,096 positions):
# q4+q4 then bf16 10.6B 8-layer layouts in VRAM, 512 / 2048 / 4000-token prompts.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
for v in q4 bf16; do
  lay=layout-q4; [ $v = bf16 ] && { lay=layout; peers_layout layout source source; }
  timeout 150 python3 tools/profile_prefill.py -m $W/$lay --tokens 512,2048,4000 --top 14 --json > $OUT/profile-prefill-$v.log 2>&1
  echo "profile $v rc=$? $(el)"; grep -E "^==|^   " $OUT/profile-prefill-$v.log | head -50; tail -3 $OUT/profile-prefill-$v.log | cut -c1-300
  mv $OUT/profile-prefill.json $OUT/profile-prefill-$v.json 2>/dev/null; pack
done
