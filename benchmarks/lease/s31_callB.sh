#!/usr/bin/env bash
# Session 31, call B (the warm box of call A): llama.cpp on the same gpt-oss checkpoint (/root/bgo/ck). Build
# (tools/build_llamacpp.sh) beside the bf16 GGUF conversion, then llama-quantize to MXFP4_MOE (experts MXFP4, the
# other matrices Q8_0) and Q4_0, then llama-bench pp512 / tg64 on the three GGUFs, all layers on the GPU.
source "$(dirname "$0")/lib.sh"
G=/root/bgo
[ -f $G/ck/config.json ] || { echo "no checkpoint at $G/ck: call A's box is gone"; exit 1; }
(JOBS=12 bash tools/build_llamacpp.sh .carry/llama.cpp /root/lb > $OUT/build.log 2>&1; echo "build rc=$?" >> $OUT/build.log) &
BUILD=$!
[ -f $G/model-bf16.gguf ] || { python3 tools/convert_gguf.py --llama-dir .carry/llama.cpp $G/ck --outtype bf16 \
  --outfile $G/model-bf16.gguf.tmp > $OUT/convert.log 2>&1 && mv $G/model-bf16.gguf.tmp $G/model-bf16.gguf; }
echo "convert rc=$? $(el)"; tail -2 $OUT/convert.log; pack
wait $BUILD; echo "build $(tail -1 $OUT/build.log) $(el)"; pack
for q in MXFP4_MOE Q4_0; do
  [ -f $G/model-$q.gguf ] || timeout 200 /root/lb/bin/llama-quantize $G/model-bf16.gguf $G/model-$q.gguf $q 16 \
    > $OUT/quantize-$q.log 2>&1
  echo "quantize $q rc=$? $(el)"; grep -E "model size|quant size|type +[a-z0-9_]+: +[0-9]+ tensors" $OUT/quantize-$q.log | tail -8
  pack
done
for q in bf16 MXFP4_MOE Q4_0; do
  timeout 100 /root/lb/bin/llama-bench -m $G/model-$q.gguf -ngl 99 -p 512 -n 64 -r 3 -o json > $OUT/llama-bench-$q.json \
    2> $OUT/llama-bench-$q.err
  echo "bench $q rc=$? $(el)"; python3 -c "
import json; [print(r['n_prompt'], r['n_gen'], round(r['avg_ts'], 1)) for r in json.load(open('$OUT/llama-bench-$q.json'))]"
  pack
done
ls -la $G/*.gguf; df -h /root | tail -1
