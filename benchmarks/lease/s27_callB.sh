#!/usr/bin/env bash
# Session 27, call B (warm after A): the batch decode in VRAM at B = 8 / 32 / 128 (own routing) with its decode
# steps profiled by kernel at B = 128 (bench_batch_gpu.py --profile): q4+q4 with the picked tiles, q4+q4 with
# call A's fastest few-row tile (TIERED_QGROUPED_FEW), and bf16.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
SPEC=$(python3 benchmarks/lease/s27_pick.py /root/res_s27_callA/quant_prefill.json | head -1); echo "few tile: $SPEC"
batch() {  # TAG LAYOUT [VAR=VALUE ...]
  local tag=$1 lay=$2; shift 2
  rm -f /root/bb-$tag/batch_gpu.json
  env "$@" timeout 150 python3 benchmarks/bench_batch_gpu.py --layout $W/$lay --work /root/bb-$tag --phases vram \
    --batches 8,32,128 --paths graphs --routing own --profile 128 --text .carry/shared/text > $OUT/batch-$tag.log 2>&1
  echo "batch $tag rc=$? $(el)"; grep -E "tok/s|profile" $OUT/batch-$tag.log | cut -c1-400 | tail -5
  cp /root/bb-$tag/batch_gpu.json $OUT/batch-$tag.json 2>/dev/null; pack
}
batch q4 layout-q4
[ -n "$SPEC" ] && batch q4-few layout-q4 TIERED_QGROUPED_FEW=$SPEC
batch bf16 layout
