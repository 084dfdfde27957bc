#!/usr/bin/env bash
# Session 44, call B: call A found the Gluon q4 GEMV exact but slower than the word tile (lm_head on the H100: 83 us
# at BN 64 against 65; ptxas issues each step's two 8-byte loads about one step before its mma, so few bytes are in
# flight). Now the words of 1, 2 or 4 steps a load with the next load issued before the current steps are computed
# (quant_gluon's D): its CUDA tests, the probe at the lm_head and o_proj (BN 64 / 128, a program a block), then the
# peers checkpoint's VRAM decode in q4+q4: TUNED's tiles against algo 3 on the lm_head at the two best guesses.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
cuda_tests 150 tests/test_quant_gluon.py
timeout 200 python3 tools/gluon_q4_probe.py --gpu --bn 64,128 --persist 0 --ahead 1,2,4 --only lm_head,o_proj > $OUT/gluon-q4.log 2>&1
echo "gluon q4 rc=$? $(el)"; grep -E 'Error|error' $OUT/gluon-q4.log | tail -3
python3 - <<'PY'
import json, os
d = json.load(open(os.path.join(os.environ["OUT"], "gluon_q4.json")))
for name, row in d["products"].items():
    print(name, "tuned", round(row["tuned_nopdl_us"], 1), round(row["tuned_pdl_us"], 1), "engine_t2",
          row.get("engine_rel_err_t2"))
    for k, r in row.items():
        if isinstance(r, dict):
            print("  ", k, r.get("rel_err"), round(r.get("us", 0), 1), round(r.get("us_pdl", 0), 1),
                  round(r.get("tbps", 0), 2))
PY
pack
peers_layouts
peers_vram q4 default
peers_vram q4 gluon-64a4 TIERED_QCONFIG="gemv,q4,2048,151936:bn=64,algo=3,ahead=4"
peers_vram q4 gluon-128a2 TIERED_QCONFIG="gemv,q4,2048,151936:bn=128,algo=3,ahead=2"
pack
# then, time allowing, what a kernel boundary costs against a grid barrier (session 43's bench, never run yet)
[ $(( $(date +%s) - T0 )) -lt 260 ] && timeout 120 python3 benchmarks/bench_grid_barrier_gpu.py \
  > $OUT/grid-barrier.log 2>&1; echo "grid barrier rc=$? $(el)"; grep -vE '^\{' $OUT/grid-barrier.log | tail -8
pack
