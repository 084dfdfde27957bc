#!/usr/bin/env bash
# Session 12, lease call H1 (H2 follows at once, on the warm box): llama.cpp builds on the CPU while the GPU makes the
# peers checkpoint (seed 0), its bf16 GGUF and the bf16 tiered layout; then the CUDA tests of the CPU mailbox (its
# device-side probe now sleeps the device while the host enqueues the kernels, so the round trip's fixed cost no
# longer counts Python's launch time). Leaves /root/peers and /root/lb for H2.
source "$(dirname "$0")/lib.sh"
(JOBS=14 bash tools/build_llamacpp.sh .carry/llama.cpp /root/lb > $OUT/build.log 2>&1; echo "build rc=$?" >> $OUT/build.log) &
BUILD=$!
peers_ckpt
(python3 tools/convert_gguf.py --llama-dir .carry/llama.cpp $W/ckpt --outtype bf16 --outfile $W/model-bf16.gguf.tmp \
   > $W/convert.log 2>&1 && mv $W/model-bf16.gguf.tmp $W/model-bf16.gguf; echo "convert rc=$? $(el)") &
CONV=$!
peers_layout layout source source
timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_cpu_mailbox.py \
  > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -4; echo "tests done $(el)"; pack
wait $CONV; wait $BUILD; grep -E "built|rc=" $OUT/build.log; echo "build done $(el)"; sync
ls -la $W /root/lb/bin 2>/dev/null | head -30; pack
