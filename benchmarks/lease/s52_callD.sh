#!/usr/bin/env bash
# Session 52, call D: call C cut to what about 300 s of device time holds (eleven refused starts left less): the
# peers checkpoint and its q4+q4 and bf16 layouts; the Gluon q4 GEMV against TUNED's word tile at the lm_head on
# this card (never timed on an H200); tiered's VRAM decode q4+q4 and bf16, and q4+q4 with the probe's fastest
# lm_head entry when it beat TUNED's PDL launch by 3% or more, alternating while time is left.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
timeout 90 python3 tools/gluon_q4_probe.py --gpu --bn 64,128 --persist 0 --ahead 2,4 --groups 2,4 \
  --only lm_head > $OUT/gluon-probe.log 2>&1
echo "gluon probe rc=$? $(el)"; grep -E "TUNED|rel err|best" $OUT/gluon-probe.log | tail -12; pack
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
peers_vram q4 a
[ -n "$GL" ] && peers_vram q4 g "TIERED_QCONFIG=$GL"
peers_vram bf16 a
[ $(( $(date +%s) - T0 )) -lt 280 ] && peers_vram q4 b
[ -n "$GL" ] && [ $(( $(date +%s) - T0 )) -lt 300 ] && peers_vram q4 g2 "TIERED_QCONFIG=$GL"
decode_table
true
