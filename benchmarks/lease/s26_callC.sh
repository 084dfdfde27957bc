#!/usr/bin/env bash
# Session 26, call C (warm box, after B): tiered's batched decode in VRAM (bench_batch_gpu.py --phases vram on the
# peers layouts, 64-token prompts, 64 new tokens, B = 1, 8, 32, 128, own and replayed routing) through three step
# paths in one process per layout: graphs (the default), model (the same expert path, eager), major (the
# expert-major path of earlier sessions); then the single-sequence prefill of 512 and 4000 tokens (default chunk).
source "$(dirname "$0")/lib.sh"
for v in q4 bf16; do
  lay=layout-q4; [ $v = bf16 ] && lay=layout
  rm -f /root/bb-$v/batch_gpu.json
  timeout 230 python3 benchmarks/bench_batch_gpu.py --layout $W/$lay --work /root/bb-$v --phases vram \
    --paths graphs,model,major --text .carry/shared/text > $OUT/batch-$v.log 2>&1
  echo "batch $v rc=$? $(el)"; grep -E "^\[|^vram" $OUT/batch-$v.log | grep -E "tok/s|^vram" | tail -40
  cp /root/bb-$v/batch_gpu.json $OUT/batch-$v.json 2>/dev/null; pack
done
for v in q4 bf16; do
  lay=layout-q4; [ $v = bf16 ] && lay=layout
  timeout 100 python3 tools/profile_prefill.py -m $W/$lay --tokens 512,4000 --chunks 0 --no-profile --json \
    > $OUT/prefill-$v.log 2>&1
  echo "prefill $v rc=$? $(el)"; grep -E "^==|tok/s" $OUT/prefill-$v.log | tail -4; mv $OUT/profile-prefill.json $OUT/prefill-$v.json; pack
done
