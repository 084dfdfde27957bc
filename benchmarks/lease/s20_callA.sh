#!/usr/bin/env bash
# Session 20, call A (cold box): why --device-fill auto (the default) trails a fixed 6 on q4+q4 at --vram-gb 4 with
# replayed routing (s19 E: 2,111.8 against 2,322.4 tok/s; hit rate 0.9855 and 516 blocks filled, where the CPU
# simulation of the same routing with N 5 from the 7th step gives 0.9931 and 574), and what the fill phase costs.
#   1. the step-by-step timeline (bench --timeline: each step's device us, the fill's picks, the demand misses) of
#      the default, a fixed 6 and 6 with 16 copy programs, in their own invocation (the recording costs a few us);
#   2. the headline rows: the default, fixed 6 and 8, each also with 16 copy programs;
#   3. the default under TIERED_FILL_SHARE=0.9 (N 6 where 0.75 gives 5);
#   4. a 511-token decode: the default, a fixed 6 and the fill off, where the fill's start-up is a smaller share.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
TL="default,lru+fill6/device,lru+fill6:16/device"
TIMEOUT=150 LAYOUT=layout-q4 offload_variant timeline "$TL" --device-fill 6,6:16 --timeline "$TL"
python3 - "$OUT/offload-layout-q4-timeline.json" <<'PY'
import json, sys
d = json.loads(open(sys.argv[1]).read())
for k, r in d["docs"][0]["runs"].items():
    t = r.get("timeline") or {}
    print(k, round(r["decode_tok_s"], 1), r.get("device_fill"),
          {x: t.get(x) for x in ("steps", "first_fill_step", "last_fill_step", "fill_steps", "mean_us_filling",
                                 "mean_us_rest", "misses_filling", "misses_rest", "mean_us", "error")})
    if t.get("step_us"):
        print("  fill_n", t["fill_n"][:24], "picks", t["picks"][:24])
        print("  us", t["step_us"][:24])
PY
pack
TIMEOUT=200 LAYOUT=layout-q4 offload_variant base \
  "default,lru+fill6/device,lru+fill8/device,lru+fill6:16/device,lru+fill8:16/device" --device-fill 6,8,6:16,8:16
TIERED_FILL_SHARE=0.9 TIMEOUT=100 LAYOUT=layout-q4 offload_variant share09 "default"
TIMEOUT=150 LAYOUT=layout-q4 offload_variant long "default,lru+fill6/device,lru/device" --device-fill 6 \
  --new-tokens 512
