#!/usr/bin/env bash
# Session 46, call D: the decode attention's combine with a short tile (under a grid of more than 16 splits, the
# accumulators of the first 16 only when no later split holds keys the row sees) against the kernel before it
# (044bb2c's attention.py, carried in .carry/old), and in the attention bench call B's chunked loop (b36fdbb's). The attention alone (bench_attention, B 1 and 8, under an
# 800- and a 4096-position capacity), then the VRAM decode of the 8-layer 10.6B shape, q4+q4, alternating fresh
# processes: at bench_peers' capacity (800) and at `tiered run`'s default 4096; then the attention's CUDA tests.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
cp tiered/kernels/attention.py /root/att_new.py
use() { case $1 in old) cp .carry/old/attention_044bb2c.py tiered/kernels/attention.py;;
  chunk) cp .carry/old/attention_b36fdbb.py tiered/kernels/attention.py;; *) cp /root/att_new.py tiered/kernels/attention.py;; esac; }
for v in new old chunk; do
  use $v
  python3 benchmarks/bench_attention.py --contexts 528,784 --batches 1 --max-context 800 > $OUT/attn-800-$v.log 2>&1
  cp $OUT/attention.json $OUT/attention-800-$v.json 2>/dev/null
  python3 benchmarks/bench_attention.py --contexts 528,2048,4096 --batches 1,8 --max-context 4096 > $OUT/attn-4096-$v.log 2>&1
  cp $OUT/attention.json $OUT/attention-4096-$v.json 2>/dev/null
  grep -A9 "splits" $OUT/attn-800-$v.log $OUT/attn-4096-$v.log | grep -E "^\S+-\s+[0-9]" | cut -c1-110
done
use new; echo "attention $(el)"; pack
peers_layouts
ctx4k() {  # VARIANT TAG: bench_peers' VRAM decode at --max-context 4096 -> $OUT/tiered-VARIANT-TAG.json
  local v=$1 tag=$2 f=$W/tiered.json; [ $v = bf16 ] || f=$W/tiered-$v.json; rm -f $f
  timeout 100 python3 benchmarks/bench_peers.py --phase tiered --work $W --variant $v --tiered-only vram \
    --max-context 4096 > $OUT/peers-$v-$tag.log 2>&1
  echo "tiered $v $tag rc=$? $(el)"; grep -iE "decode tok/s" $OUT/peers-$v-$tag.log | grep -v '^{' | tail -1
  cp $f $OUT/tiered-$v-$tag.json 2>/dev/null; pack
}
use new; peers_vram q4 new
use old; peers_vram q4 old
use new; ctx4k q4 new4k
use old; ctx4k q4 old4k
use new; peers_vram q4 new2
use old; peers_vram q4 old2
use new; ctx4k q4 new4k2
use old; ctx4k q4 old4k2
use new
for f in $OUT/tiered-*-*.json; do python3 -c "
import json; d = json.load(open('$f')); d = d.get('modes', {}).get('vram', d)
print('$f'.split('/')[-1], {k: round(d[k]['decode_tok_s'], 1) for k in ('decode_short', 'decode_long') if k in d})" 2>&1 | tail -1; done
pack
cuda_tests 100 tests/test_attention_kernel.py tests/test_fused_glue.py
