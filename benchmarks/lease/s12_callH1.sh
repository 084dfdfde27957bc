#!/usr/bin/env bash
# Session 12, lease call H1 (H2 follows at once, on the warm box): llama.cpp builds on the CPU while the GPU makes the
# peers checkpoint (seed 0), its bf16 GGUF and the bf16 tiered layout; then the CUDA tests of the CPU mailbox (its
# device-side probe now sleeps the device while the host enqueues the kernels, so the round trip's fixed cost no
# longer counts Python's launch time). Leaves /root/peers and /root/lb for H2.
source "$(dirname "$0")/lib.sh"
llama_bg
peers_layout layout source source
cuda_tests 150 tests/test_cpu_mailbox.py
wait $CONV; wait $BUILD; grep -E "built|rc=" $OUT/build.log; echo "build done $(el)"; sync
ls -la $W /root/lb/bin 2>/dev/null | head -30; pack
