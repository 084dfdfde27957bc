#!/usr/bin/env bash
# Session 42, call B (after call A, same warm box): issue 13's VRAM decode with the looping GEMV tiles. The peers
# checkpoint (8-layer 10.6B shape) in q4+q4 and bf16; bench_peers' VRAM decode of bf16, q4 under TUNED (default),
# q4 with call A's winners (its gemv_loop.json "qconfig" through TIERED_QCONFIG), and the default again; then the
# kernel profile (tools/profile_kernels.py, glue on) of q4 under the winners.
source "$(dirname "$0")/lib.sh"
peers_layouts
QC=$(python3 -c "import json; print(json.load(open('/root/res_s42_callA/gemv_loop.json'))['qconfig'])" 2>/dev/null)
echo "qconfig: $QC"
peers_vram bf16 base
peers_vram q4 default
[ -n "$QC" ] && peers_vram q4 loop "TIERED_QCONFIG=$QC"
peers_vram q4 default2
[ -n "$QC" ] && peers_vram q4 loop2 "TIERED_QCONFIG=$QC"
for f in $OUT/tiered-*.json; do python3 -c "
import json; d = json.load(open('$f')); d = d.get('modes', {}).get('vram', d)
print('$f'.split('/')[-1], {k: d[k]['decode_tok_s'] for k in ('decode_short', 'decode_long') if k in d})" 2>&1 | tail -1; done
[ -n "$QC" ] && [ $(( $(date +%s) - T0 )) -lt 440 ] && TIERED_QCONFIG="$QC" timeout 110 python3 tools/profile_kernels.py \
  -m $W/layout-q4 --glue on --tokens 16 > $OUT/profile-q4-loop.log 2>&1 && grep -v '^{' $OUT/profile-q4-loop.log \
  | grep -vE "^\[profile" | head -16
pack
