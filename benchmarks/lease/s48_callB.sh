#!/usr/bin/env bash
# Session 48, call B: the Gluon gate_up copying its words, scales and minima into shared memory all at once
# (cp.async; TIERED_GLUON_ASYNC=0 keeps the register loads, which ptxas issues next to their first use: four rounds
# of words and a fifth of scales, each an HBM latency), the VRAM decode of the 8-layer 10.6B shape at bench_peers'
# capacity, q4+q4 alternating fresh processes twice, bf16 once; whether the engine's stacks take the copies; the
# CUDA tests of quant_gluon_moe; the replayed step's timeline.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
timeout 120 python3 - > $OUT/async-ok.log 2>&1 <<'PY'
import tiered
from tiered.kernels import quant_gluon_moe as qgm
seen = []
real = qgm.async_ok
qgm.async_ok = lambda *a, **k: seen.append(real(*a, **k)) or seen[-1]
eng = tiered.load("/root/peers/layout-q4", device="cuda", dtype="bfloat16", max_context=256)
eng.generate(list(range(100, 116)), max_new_tokens=4, stop_at_eos=False)
print("async_ok calls", len(seen), "true", sum(seen))
PY
echo "async-ok rc=$? $(el)"; tail -1 $OUT/async-ok.log
peers_vram q4 async
peers_vram q4 regs TIERED_GLUON_ASYNC=0
peers_vram q4 async2
peers_vram q4 regs2 TIERED_GLUON_ASYNC=0
peers_vram bf16 base
decode_table
cuda_tests 200 tests/test_quant_gluon_moe.py
timelines q4
