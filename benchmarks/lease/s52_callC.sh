#!/usr/bin/env bash
# Session 52, call C: calls A and B in one call without llama.cpp (the device refused starts; a build costs ~240 s).
# The peers checkpoint and its layouts (q4+q4, bf16, --experts q4 alone); the Gluon q4 GEMV against TUNED's word tile
# at the lm_head on this card (BN 64/128, 2/4 steps a load, 2/4 groups a step: sessions 44-45's best on an H100);
# issue 12's offload at HEAD (bf16, --vram-gb 4, one eval
# document's replayed routing: default, lru/device, lru+cpu/device, nextuse+pf1/device; the bounds are measured in
# the same run); the VRAM decode q4+q4 / bf16 / q4e / q4+q4 (with the probe's lm_head entry when it beat TUNED) /
# bf16; the timelines if time is left. Each later step is skipped past its time guard.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_ckpt
peers_layout layout-q4 q4 q4
peers_layout layout source source
peers_layout layout-q4e q4 source
pack
timeout 100 python3 tools/gluon_q4_probe.py --gpu --bn 64,128 --persist 0 --ahead 2,4 --groups 2,4 \
  --only lm_head > $OUT/gluon-probe.log 2>&1
echo "gluon probe rc=$? $(el)"; grep -vE '^\{' $OUT/gluon-probe.log | grep -E "TUNED|bn|best" | tail -24; pack
GL=$(python3 - <<PY 2>/dev/null
import json
rows = [json.loads(l.split(" ", 1)[1]) for l in open("$OUT/gluon-probe.log") if l.startswith("lm_head {")]
r = rows[-1] if rows else {}
best = min(((v["us_pdl"], k) for k, v in r.items() if isinstance(v, dict) and v.get("us_pdl")), default=None)
if best and best[0] < 0.97 * r["tuned_pdl_us"]:
    bn, _, a, g = best[1].split("_")
    print(f"gemv,q4,2048,151936:bn={bn[2:]},algo=3,ahead={a[1:]},bg={g[1:]}")
PY
)
echo "lm_head entry: ${GL:-none (TUNED kept)}"
TIMEOUT=200 offload_variant default "default,lru/device,lru+cpu/device,nextuse+pf1/device" --nextuse-prefetch 1
peers_vram q4 a
peers_vram bf16 a
[ $(( $(date +%s) - T0 )) -lt 400 ] && peers_vram q4e a
[ -n "$GL" ] && [ $(( $(date +%s) - T0 )) -lt 430 ] && peers_vram q4 g "TIERED_QCONFIG=$GL"
[ $(( $(date +%s) - T0 )) -lt 400 ] && peers_vram q4 b
[ $(( $(date +%s) - T0 )) -lt 420 ] && peers_vram bf16 b
decode_table
[ $(( $(date +%s) - T0 )) -lt 420 ] && timelines q4
true
