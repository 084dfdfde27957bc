#!/usr/bin/env bash
# Session 27, call C: the grouped q4 kernels with longer reduction steps (a whole 128-byte line of each weight row
# a step; bench_quant_kernels.py --swap-sweep, 10.6B, T = 16 / 128 / 512) alone on the GPU; the peers layouts
# (a cold box rebuilds them); then the batch decode in VRAM after the align kernel and the scheduler's host work
# (B = 1 / 8 / 32 / 128, own routing, profiled at 128): q4+q4 with the picked tiles, with the sweep's fastest
# few-row tile (TIERED_QGROUPED_FEW), and bf16.
source "$(dirname "$0")/lib.sh"
timeout 125 python3 benchmarks/bench_quant_kernels.py --phase prefill --prefill-formats q4 --tokens 16,128,512 \
  --shapes 10.6B --swap-sweep --no-gemlite --max-seconds 110 > $OUT/kernels.log 2>&1
echo "kernels rc=$? $(el)"; grep -E "q4|bf16" $OUT/kernels.log | grep -v "^{" | cut -c1-130 | tail -45; pack
peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
SPEC=$(python3 benchmarks/lease/s27_pick.py $OUT/quant_prefill.json | head -1); echo "few tile: $SPEC"
batch() {  # TAG LAYOUT ROUTING [VAR=VALUE ...]
  local tag=$1 lay=$2 routing=$3; shift 3
  rm -f /root/bb-$tag/batch_gpu.json
  env "$@" timeout 150 python3 benchmarks/bench_batch_gpu.py --layout $W/$lay --work /root/bb-$tag --phases vram \
    --batches 1,8,32,128 --paths graphs --routing $routing --profile 128 --text .carry/shared/text > $OUT/batch-$tag.log 2>&1
  echo "batch $tag rc=$? $(el)"; grep -E "tok/s|profile" $OUT/batch-$tag.log | cut -c1-300 | tail -10
  cp /root/bb-$tag/batch_gpu.json $OUT/batch-$tag.json 2>/dev/null; pack
}
batch q4 layout-q4 ${ROUTING:-own}
[ -n "$SPEC" ] && batch q4-few layout-q4 own TIERED_QGROUPED_FEW=$SPEC
batch bf16 layout ${ROUTING:-own}
