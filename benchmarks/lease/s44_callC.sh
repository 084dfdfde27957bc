#!/usr/bin/env bash
# Session 44, call C (lean: device time was short): the Gluon q4 GEMV with two groups a step (a thread's words of a
# row 16 bytes a load, quant_gluon's G) against one (call B: BN 64, 4 steps a load, PDL: 74.3 us against the word
# tile's 65.3 / 70.8 at the lm_head on the H100), checked and timed at the lm_head and o_proj; then the decode step
# only if a variant beats TUNED's lm_head with PDL.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
timeout 150 python3 tools/gluon_q4_probe.py --gpu --bn 64,128 --persist 0 --ahead 2,4 --groups 1,2 \
  --only lm_head,o_proj > $OUT/gluon-q4.log 2>&1
echo "gluon q4 rc=$? $(el)"; grep -E 'Error|error' $OUT/gluon-q4.log | tail -3
BEST=$(python3 - <<'PY'
import json, os
d = json.load(open(os.path.join(os.environ["OUT"], "gluon_q4.json")))
best = None
for name, row in d["products"].items():
    print(name, "tuned", round(row["tuned_nopdl_us"], 1), round(row["tuned_pdl_us"], 1), file=__import__("sys").stderr)
    for k, r in row.items():
        if isinstance(r, dict):
            print("  ", k, r.get("rel_err"), round(r.get("us", 0), 1), round(r.get("us_pdl", 0), 1),
                  file=__import__("sys").stderr)
            if name == "lm_head" and r.get("us_pdl") and r["us_pdl"] < row["tuned_pdl_us"]:
                if best is None or r["us_pdl"] < best[0]:
                    best = (r["us_pdl"], k)
if best:
    bn, _, a, g = best[1].split("_")
    print(f"gemv,q4,2048,151936:bn={bn[2:]},algo=3,ahead={a[1:]},bg={g[1:]}")
PY
)
echo "best: ${BEST:-none}"; pack
if [ -n "$BEST" ]; then
  peers_ckpt; peers_layout layout-q4 q4 q4
  peers_vram q4 default
  peers_vram q4 gluon TIERED_QCONFIG="$BEST"
fi
pack
