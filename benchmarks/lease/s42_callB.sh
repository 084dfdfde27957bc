#!/usr/bin/env bash
# Session 42, call B (the device lent H100s only): issue 13's VRAM decode ratio on an H100, where bf16's products are
# bound by HBM (3.35 TB/s against the H200's 4.8) while q4's GEMVs took the same time on both cards (lm_head 70 us).
# The peers checkpoint (8-layer 10.6B shape) in q4+q4 and bf16; bench_peers' VRAM decode of bf16, q4, q4 again and
# bf16 again (fresh processes, TUNED's tiles), then the kernel profiles of both (tools/profile_kernels.py, glue on).
source "$(dirname "$0")/lib.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
peers_layouts
peers_vram bf16 base
peers_vram q4 default
peers_vram q4 default2
peers_vram bf16 base2
for f in $OUT/tiered-*.json; do python3 -c "
import json; d = json.load(open('$f')); d = d.get('modes', {}).get('vram', d)
print('$f'.split('/')[-1], {k: d[k]['decode_tok_s'] for k in ('decode_short', 'decode_long') if k in d})" 2>&1 | tail -1; done
for v in layout-q4 layout; do
  [ $(( $(date +%s) - T0 )) -lt 430 ] && timeout 80 python3 tools/profile_kernels.py -m $W/$v --glue on \
    --tokens 16 > $OUT/profile-$v.log 2>&1; grep -v '^{' $OUT/profile-$v.log | grep -vE "^\[profile|Warn|warn" | head -14
done
pack
