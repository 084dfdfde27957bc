#!/usr/bin/env bash
# Session 45, call B: the experts' gate_up and down on tensor cores in Gluon (tiered/kernels/quant_gluon_moe.py,
# QConfig.algo 3 of the expert kernels). Session 43's probe read gate_up's words 4 bytes a load (a select between the
# gate and up row pointers hid their alignment); now 8-byte loads at one group a step, 16-byte from two.
# 1. tools/gluon_q4_experts_probe.py --gpu: 1, 2, 4 groups a step x 1, 2, 4 steps a load, each checked against the
#    dequantized reference, then timed in a CUDA graph of 8 calls on other slots against TUNED's word tiles (no PDL).
# 2. the CUDA tests of quant_gluon_moe (slot base, h layouts, weight rounding, PDL, graph, the dispatch) and of the
#    decode attention (1bae381).
# 3. bench_peers' VRAM decode of the 8-layer 10.6B shape, q4+q4: TUNED, the fastest Gluon gate_up alone (h handed to
#    the word-tile down word-major), the fastest Gluon gate_up and down, TUNED again, Gluon both again, bf16.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
timeout 200 python3 tools/gluon_q4_experts_probe.py --gpu > $OUT/gluon-q4-experts.log 2>&1
echo "experts rc=$? $(el)"; grep -E '^(gate_up|down):? |^best|rror' $OUT/gluon-q4-experts.log | grep -v '{' | cut -c1-900
BEST=$(grep '^best ' $OUT/gluon-q4-experts.log | cut -d' ' -f2- | tr ' ' ';'); GU=${BEST%%;*}
echo "best: $BEST / gate_up only: $GU"; pack
cuda_tests 200 tests/test_quant_gluon_moe.py tests/test_attention_kernel.py
peers_layouts
peers_vram q4 default
[ -n "$GU" ] && peers_vram q4 gluon-gu TIERED_QCONFIG="$GU"
[ -n "$BEST" ] && peers_vram q4 gluon-both TIERED_QCONFIG="$BEST"
peers_vram q4 default2
[ -n "$BEST" ] && peers_vram q4 gluon-both2 TIERED_QCONFIG="$BEST"
peers_vram bf16 base
for f in $OUT/tiered-*.json; do python3 -c "
import json; d = json.load(open('$f')); d = d.get('modes', {}).get('vram', d)
print('$f'.split('/')[-1], {k: d[k]['decode_tok_s'] for k in ('decode_short', 'decode_long') if k in d})" 2>&1 | tail -1; done
pack
