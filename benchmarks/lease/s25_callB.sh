#!/usr/bin/env bash
# Session 25, call B: where a whole-model prefill goes (tools/profile_prefill.py): q4+q4 and bf16 10.6B 8-layer
# layouts in VRAM, 512 / 2048 / 8192-token prompts, warm rates and one profiled run each (kernel time against wall).
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
timeout 170 python3 tools/profile_prefill.py -m $W/layout-q4 --tokens 512,2048,8192 --json > $OUT/profile-prefill-q4.log 2>&1
echo "profile q4 rc=$? $(el)"; grep -E "^==|^   " $OUT/profile-prefill-q4.log | head -70
mv $OUT/profile-prefill.json $OUT/profile-prefill-q4.json 2>/dev/null; pack
peers_layout layout source source; pack
timeout 150 python3 tools/profile_prefill.py -m $W/layout --tokens 512,2048,8192 --json > $OUT/profile-prefill-bf16.log 2>&1
echo "profile bf16 rc=$? $(el)"; grep -E "^==|^   " $OUT/profile-prefill-bf16.log | head -70
mv $OUT/profile-prefill.json $OUT/profile-prefill-bf16.json 2>/dev/null; pack
