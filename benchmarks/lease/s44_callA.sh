#!/usr/bin/env bash
# Session 44, call A: the Gluon q4 GEMV on tensor cores (tiered/kernels/quant_gluon.py, QConfig.algo 3), first
# through tools/gluon_q4_probe.py --gpu (checked against the reference at lm_head, qkv and o_proj, then timed against
# TUNED's word tile with and without PDL, BN 64 / 128 / 256, persist 0 / 4; the engine's dispatch checked at two
# rows) and its CUDA tests (tests/test_quant_gluon.py), then issue 13's VRAM decode on the peers checkpoint (8-layer 10.6B shape): q4+q4 with TUNED's tiles, q4+q4
# with algo 3 on the lm_head, with algo 3 on every dense GEMV, and bf16 (fresh processes); then the experts probe.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
timeout 240 python3 tools/gluon_q4_probe.py --gpu > $OUT/gluon-q4.log 2>&1
echo "gluon q4 rc=$? $(el)"; grep -E '^(lm_head|qkv|o_proj|emulated)|Error|error' $OUT/gluon-q4.log | cut -c1-1500; pack
cuda_tests 150 tests/test_quant_gluon.py
peers_layouts
peers_vram q4 default
LM="gemv,q4,2048,151936:bn=128,algo=3"
peers_vram q4 gluon-lm TIERED_QCONFIG="$LM"
peers_vram q4 gluon-all TIERED_QCONFIG="$LM;gemv,q4,2048,5120:bn=64,algo=3;gemv,q4,4096,2048:bn=64,algo=3"
peers_vram bf16 base
for f in $OUT/tiered-*.json; do python3 -c "
import json; d = json.load(open('$f')); d = d.get('modes', {}).get('vram', d)
print('$f'.split('/')[-1], {k: d[k]['decode_tok_s'] for k in ('decode_short', 'decode_long') if k in d})" 2>&1 | tail -1; done
pack
[ $(( $(date +%s) - T0 )) -lt 450 ] && timeout 100 python3 tools/gluon_q4_experts_probe.py --gpu \
  > $OUT/gluon-q4-experts.log 2>&1; echo "experts rc=$? $(el)"; grep -E '^(gate_up|down|emulated)|rror' \
  $OUT/gluon-q4-experts.log | cut -c1-800
pack
