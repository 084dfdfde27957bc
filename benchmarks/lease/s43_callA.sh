#!/usr/bin/env bash
# Session 43, call A: first the Gluon q4 GEMV on tensor cores (tools/gluon_q4_probe.py --gpu: checked against the
# reference, then timed against TUNED's GEMV at the lm_head, qkv and o_proj shapes; 1.57 SASS an input offline
# against 3.69) and its experts' gate_up (tools/gluon_q4_experts_probe.py --gpu, K split across warps); then what a dependent kernel boundary costs against a grid barrier in one persistent kernel
# (benchmarks/bench_grid_barrier_gpu.py: a chain of 64 GEMVs at D 256 / 1,024 / 2,048 as a kernel a phase with and
# without PDL, and as one kernel with a barrier a phase, with and without the next weights loaded before the spin).
# Then, on an H200, session 42's GEMV loop sweep (bench_gemv_loop_gpu.py: the loop and L2 prefetch variants were
# slower on the H100, the H200 is open); on an H100, session 41's call D (where CPU-expert runs leave the reference
# run's greedy tokens, with the reference forward's top-two gap there).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
timeout 200 python3 tools/gluon_q4_probe.py --gpu > $OUT/gluon-q4.log 2>&1
echo "gluon q4 rc=$? $(el)"; grep -E '^(lm_head|qkv|o_proj|emulated)' $OUT/gluon-q4.log | cut -c1-600; pack
timeout 120 python3 tools/gluon_q4_experts_probe.py --gpu > $OUT/gluon-q4-experts.log 2>&1
echo "gluon q4 experts rc=$? $(el)"; grep -E '^(gate_up|emulated)' $OUT/gluon-q4-experts.log | cut -c1-600; pack
timeout 150 python3 benchmarks/bench_grid_barrier_gpu.py > $OUT/grid-barrier.log 2>&1
echo "grid barrier rc=$? $(el)"; grep -vE '^\{' $OUT/grid-barrier.log | tail -8; pack
if echo "$GPU" | grep -q H200; then
  timeout 330 python3 benchmarks/bench_gemv_loop_gpu.py > $OUT/gemv-loop.log 2>&1
  echo "gemv loop rc=$? $(el)"; grep -vE '^\{' $OUT/gemv-loop.log | tail -6
else
  peers_ckpt; peers_layout layout source source; pack
  TIMEOUT=200 offload_variant div "lru+cpu/device,default"
  python3 -c "
import json; d = json.loads(open('$OUT/offload-bf16-div.json').read())
for doc in d['docs']: print(doc['tokens_identical'], json.dumps(doc.get('divergence')))"
fi
pack
