#!/usr/bin/env bash
# Session 41, call B (right after call A, on the same warm box): issue 13's VRAM decode ratio with 8-bit inputs. The
# peers checkpoint (8-layer 10.6B shape) in q4+q4 and bf16; bench_peers' VRAM decode of bf16, then q4 with float
# inputs (the default), with TIERED_GPU_ACT=q8 (every q4 product takes 8-bit inputs) and with call A's per-product
# winners (its act8_kernels.json "qconfig" through TIERED_QCONFIG: act 1 only where it was faster); then the
# kernel profile (tools/profile_kernels.py, glue on) of q4 under the faster of the two act 1 runs.
source "$(dirname "$0")/lib.sh"
peers_layouts
peers_vram bf16 base
peers_vram q4 float
peers_vram q4 q8all TIERED_GPU_ACT=q8
QC=$(python3 -c "import json; print(json.load(open('/root/res_s41_callA/act8_kernels.json'))['qconfig'])" 2>/dev/null)
echo "qconfig: $QC"
[ -n "$QC" ] && peers_vram q4 q8sel "TIERED_QCONFIG=$QC"
for f in $OUT/tiered-*.json; do python3 -c "
import json; d = json.load(open('$f')); d = d.get('modes', {}).get('vram', d)
print('$f'.split('/')[-1], {k: d[k]['decode_tok_s'] for k in ('decode_short', 'decode_long') if k in d})" 2>&1 | tail -1; done
[ $(( $(date +%s) - T0 )) -lt 420 ] && TIERED_GPU_ACT=q8 timeout 110 python3 tools/profile_kernels.py -m $W/layout-q4 \
  --glue on --tokens 16 > $OUT/profile-q4-q8.log 2>&1 && grep -v '^{' $OUT/profile-q4-q8.log | grep -vE "^\[profile" | head -24
pack
