#!/usr/bin/env bash
# Session 26, call D (cold box): the q4+q4 and bf16 layouts again, then what changed after call C:
#  - the single-sequence prefill graphs: profile_prefill at 64 / 512 / 4000 tokens, graphs against eager, one process
#    per layout (llama.cpp's pp512 / pp4000 are call B's);
#  - the batch step's prompts: fresh prompts attended together (graphs) against row by row (rowattn), 2048 prompt
#    tokens a step (the new resident default), B = 32 and 128, own routing;
#  - the CUDA tests of the prefill graphs and the batch step.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
prefill() {  # VARIANT LAYOUT
  timeout 100 python3 tools/profile_prefill.py -m $W/$2 --tokens 64,512,4000 --modes graphs,eager --no-profile \
    --repeats 5 --json > $OUT/prefill-$1.log 2>&1
  echo "prefill $1 rc=$? $(el)"; grep -E "^==" $OUT/prefill-$1.log; mv $OUT/profile-prefill.json $OUT/prefill-$1.json; pack
}
batch() {  # VARIANT LAYOUT
  rm -f /root/bb-$1/batch_gpu.json
  timeout 120 python3 benchmarks/bench_batch_gpu.py --layout $W/$2 --work /root/bb-$1 --phases vram --batches 32,128 \
    --paths graphs,rowattn --routing own --text .carry/shared/text > $OUT/batch-$1.log 2>&1
  echo "batch $1 rc=$? $(el)"; grep -E "tok/s" $OUT/batch-$1.log | tail -4
  cp /root/bb-$1/batch_gpu.json $OUT/batch-$1.json 2>/dev/null; pack
}
prefill q4 layout-q4
batch q4 layout-q4
cuda_tests 150 tests/test_engine.py tests/test_scheduler.py -k "cuda_prefill_graphs or cuda_graphed or cuda_batched" -s
grep -E "agreement" $OUT/cuda-tests.log
prefill bf16 layout
batch bf16 layout
