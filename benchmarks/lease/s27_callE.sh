#!/usr/bin/env bash
# Session 27, call E: after the align kernel, single prompts (profile_prefill at 64 / 512 / 4000 tokens, graphs and
# eager) and a second process of the batch decode (own routing, B = 1 / 8 / 32 / 128) per layout, to show the
# process-to-process spread of call C's figures.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
for v in q4 bf16; do
  lay=layout-q4; [ $v = bf16 ] && lay=layout
  timeout 110 python3 tools/profile_prefill.py -m $W/$lay --tokens 64,512,4000 --modes graphs,eager --no-profile \
    --repeats 5 --json > $OUT/prefill-$v.log 2>&1
  echo "prefill $v rc=$? $(el)"; grep -E "^==" $OUT/prefill-$v.log; mv $OUT/profile-prefill.json $OUT/prefill-$v.json; pack
  rm -f /root/bb2-$v/batch_gpu.json
  timeout 100 python3 benchmarks/bench_batch_gpu.py --layout $W/$lay --work /root/bb2-$v --phases vram \
    --batches 1,8,32,128 --paths graphs --routing own --text .carry/shared/text > $OUT/batch-$v.log 2>&1
  echo "batch $v rc=$? $(el)"; grep -E "tok/s" $OUT/batch-$v.log | cut -c1-200 | tail -4
  cp /root/bb2-$v/batch_gpu.json $OUT/batch-$v.json 2>/dev/null; pack
done
