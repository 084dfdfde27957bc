#!/usr/bin/env bash
# Next lease (written in session 44): the Gluon q4 GEMV (quant_gluon, QConfig.algo 3) on whichever card comes, the
# H200 first if it is lent (its word-tile lm_head reads 2.5 TB/s of 4.8, the H100's 2.7 of 3.35). Session 44's call
# C on the H100: two groups a step, 4 steps a load, BN 128: 68.6 us with PDL against the word tile's 70.9 (65.4
# without), decode 0.99x. Here: its CUDA tests, then 2 and 4 groups a step at 2 and 4 steps a load, BN 64 / 128, at
# the lm_head and o_proj; then the decode with TUNED and with the fastest lm_head variant, twice each (fresh
# processes, alternating), and bf16 once for the ratio; then the decode attention of bbae694 (.carry/old) once.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
cuda_tests 150 tests/test_quant_gluon.py
timeout 200 python3 tools/gluon_q4_probe.py --gpu --bn 64,128 --persist 0 --ahead 2,4 --groups 2,4 \
  --only lm_head,o_proj > $OUT/gluon-q4.log 2>&1
echo "gluon q4 rc=$? $(el)"; grep -vE '^\{' $OUT/gluon-q4.log | tail -24
BEST=$(grep '^best ' $OUT/gluon-q4.log | tr ' ' '\n' | grep '151936')
echo "best: $BEST"; pack
peers_layouts
peers_vram q4 default
peers_vram q4 gluon TIERED_QCONFIG="$BEST"
peers_vram q4 default2
peers_vram q4 gluon2 TIERED_QCONFIG="$BEST"
peers_vram bf16 base
# the decode attention before 1bae381 (every split stored all M_PAD rows' partials, empty splits included): the same
# sums, fewer stores now; timed against default / default2 above
cp tiered/kernels/attention.py /tmp/attention-new.py && cp .carry/old/attention.py tiered/kernels/attention.py
peers_vram q4 oldattn
cp /tmp/attention-new.py tiered/kernels/attention.py
for f in $OUT/tiered-*.json; do python3 -c "
import json; d = json.load(open('$f')); d = d.get('modes', {}).get('vram', d)
print('$f'.split('/')[-1], {k: d[k]['decode_tok_s'] for k in ('decode_short', 'decode_long') if k in d})" 2>&1 | tail -1; done
pack
