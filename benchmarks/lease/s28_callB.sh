#!/usr/bin/env bash
# Session 28, call B (the box of call A, warm): the batch decode in VRAM with and without steps ahead (paths
# serial then graphs, one process per layout; own routing, 64-token prompts, 64 new, B = 1 / 8 / 32 / 128), q4+q4
# then bf16, then llama-bench tg128 / pp512 on both GGUFs when call A built them.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
for v in q4 bf16; do
  lay=layout-q4; [ $v = bf16 ] && lay=layout
  rm -f /root/bb-$v/batch_gpu.json
  timeout ${BT:-200} python3 benchmarks/bench_batch_gpu.py --layout $W/$lay --work /root/bb-$v --phases vram \
    --batches ${BATCHES:-1,8,32,128} --paths serial,graphs --routing own --text .carry/shared/text ${PROFILE:+--profile $PROFILE} \
    > $OUT/batch-$v.log 2>&1
  echo "batch $v rc=$? $(el)"; grep -E "tok/s|profile" $OUT/batch-$v.log | cut -c1-200 | tail -10
  cp /root/bb-$v/batch_gpu.json $OUT/batch-$v.json 2>/dev/null; pack
done
if [ -x /root/lb/bin/llama-bench ]; then
  for q in q4_0 bf16; do
    timeout 60 /root/lb/bin/llama-bench -m $W/model-$q.gguf -ngl 99 -p 512 -n 128 -r 2 -o jsonl \
      > $OUT/llama-bench-$q.jsonl 2> $OUT/llama-bench-$q.err
    echo "llama-bench $q rc=$? $(el)"; grep -o '"n_prompt": [0-9]*, "n_gen": [0-9]*\|"avg_ts": [0-9.]*' $OUT/llama-bench-$q.jsonl | paste - - ; pack
  done
fi
