#!/usr/bin/env bash
# Session 28, call C (cold box): ours and llama.cpp's batch decode on one box. llama.cpp's build in the background
# (with the checkpoint and its bf16 GGUF) beside the layouts and the GEMV/grouped cut-over sweep (bench_quant_kernels
# --phase prefill at T = 1-16, bf16 and q4, timed in CUDA graphs); once it is built, Q4_0 and llama-batched-bench;
# then our batch decode with and without steps ahead (serial runs first in the process, then graphs: the default),
# the bf16 B = 8 step profiled, and B = 8 with the grouped kernels at T = 8 (TIERED_DECODE_MAX_T=4).
# (As run, the llama.cpp block was written out here with 60 s timeouts; it is lib.sh's llama_batched now.)
source "$(dirname "$0")/lib.sh"
llama_bg
peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
timeout 100 python3 benchmarks/bench_quant_kernels.py --phase prefill --prefill-formats q4 --tokens 1,2,4,8,12,16 \
  --shapes 10.6B --no-gemlite --max-seconds 90 > $OUT/cutover.log 2>&1
echo "cutover rc=$? $(el)"; grep -E "grouped|gemv" $OUT/cutover.log | grep -v "^{" | cut -c1-150 | tail -30; pack
wait $CONV; wait $BUILD; grep -E "built|rc=" $OUT/build.log | tail -2; echo "build done $(el)"; pack
llama_batched
batch() {  # TAG LAYOUT BATCHES PATHS [VAR=VALUE ...]
  local tag=$1 lay=$2 bs=$3 paths=$4; shift 4
  rm -f /root/bb-$tag/batch_gpu.json
  env "$@" timeout 80 python3 benchmarks/bench_batch_gpu.py --layout $W/$lay --work /root/bb-$tag --phases vram \
    --batches $bs --paths $paths --routing own --text .carry/shared/text ${PROF:+--profile $PROF} > $OUT/batch-$tag.log 2>&1
  echo "batch $tag rc=$? $(el)"; grep -E "tok/s|profile" $OUT/batch-$tag.log | cut -c1-200 | tail -9
  cp /root/bb-$tag/batch_gpu.json $OUT/batch-$tag.json 2>/dev/null; pack
}
batch q4 layout-q4 1,8,32,128 graphs,serial
PROF=8 batch bf16 layout 1,8,32,128 graphs,serial
batch q4-t4 layout-q4 8 graphs TIERED_DECODE_MAX_T=4
batch bf16-t4 layout 8 graphs TIERED_DECODE_MAX_T=4
