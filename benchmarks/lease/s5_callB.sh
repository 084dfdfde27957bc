#!/usr/bin/env bash
# Session 5, lease call B: llama.cpp and tiered on the same 8-layer 10.6B-shape model in ONE call (issue 13's
# same-run baseline). llama.cpp builds on the CPU while the GPU makes the checkpoint (seed 0), the bf16 GGUF and the
# two tiered layouts (bf16; q4 experts + q4 dense), with the CUDA tests of this session's new code beside them
# (untimed); then Q4_0, llama-bench (GPU bf16, GPU Q4_0, experts on the CPU), tiered's VRAM decode/prefill for both
# layouts (greedy now runs the host one step ahead), and bench_ahead. Leaves /root/peers and /root/lb for call C.
source "$(dirname "$0")/lib.sh"
W=/root/peers; mkdir -p $W
T0=$(date +%s)
el() { echo "$(( $(date +%s) - T0 )) s"; }
(JOBS=14 bash tools/build_llamacpp.sh .carry/llama.cpp /root/lb > $OUT/build.log 2>&1; echo "build rc=$?" >> $OUT/build.log) &
BUILD=$!
python3 tools/make_random_checkpoint.py --preset qwen3-10b-8l --out $W/ckpt --seed 0 --device cuda \
  --tokenizer tiered/data/olmoe-code-17m > $OUT/make.log 2>&1; echo "make rc=$? $(el)"
(python3 tools/convert_gguf.py --llama-dir .carry/llama.cpp $W/ckpt --outtype bf16 --outfile $W/model-bf16.gguf.tmp \
   > $W/convert.log 2>&1 && mv $W/model-bf16.gguf.tmp $W/model-bf16.gguf; echo "convert rc=$? $(el)") &
CONV=$!
(timeout 230 python3 -m pytest -v -m cuda -p no:cacheprovider --tb=short $CUDA_TESTS > $OUT/cuda-tests.log 2>&1
 echo "rc=$?" >> $OUT/cuda-tests.log) &
TESTS=$!
for v in "layout source source" "layout-q4 q4 q4"; do set -- $v
  python3 -c "import json; from tiered.layout.repack import repack; print(json.dumps(repack('$W/ckpt', '$W/$1', experts='$2', dense='$3', force=True, progress=False, quant_device='cuda')))" > $OUT/repack-$1.log 2>&1
  echo "repack $1 rc=$? $(el)"
done
wait $CONV; wait $BUILD; grep -E "built|rc=" $OUT/build.log; echo "build done $(el)"
wait $TESTS; grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -12; echo "tests done $(el)"
pack
timeout 100 python3 benchmarks/bench_peers.py --phase model --work $W > $OUT/model.log 2>&1; echo "model rc=$? $(el)"; tail -2 $OUT/model.log
timeout 130 python3 benchmarks/bench_peers.py --phase llama --work $W --llama-only gpu_bf16,gpu_q4_0,cpu_experts_bf16 > $OUT/llama.log 2>&1
echo "llama rc=$? $(el)"; tail -4 $OUT/llama.log; cp $W/llama.json $W/model.json $OUT/ 2>/dev/null
pack
for v in bf16 q4; do
  timeout 75 python3 benchmarks/bench_peers.py --phase tiered --work $W --variant $v --tiered-only vram > $OUT/peers-$v.log 2>&1
  echo "tiered $v rc=$? $(el)"; grep -i "decode tok/s" $OUT/peers-$v.log | tail -1
done
cp $W/tiered*.json $OUT/ 2>/dev/null
python3 benchmarks/bench_peers.py --phase report --work $W --results-dir $OUT > $OUT/report.log 2>&1; echo "report rc=$?"
pack
timeout $(( 585 - ($(date +%s) - T0) )) python3 benchmarks/bench_ahead.py -m $W/layout > $OUT/ahead-bf16.log 2>&1
echo "ahead rc=$? $(el)"; grep -v '^{' $OUT/ahead-bf16.log | tail -8
