#!/usr/bin/env bash
# Session 14, call C1 (C2 follows on the warm box): --cpu-experts now defaults to auto where the device slot table
# runs, dropped at load when the probe's table gives the CPU none of a layer's two misses. llama.cpp builds in the
# background (with the bf16 GGUF) while the GPU runs the mailbox's CUDA tests (the default's among them) and makes the
# bf16 and q4+q4 layouts. The timed runs are C2's, on a quiet box.
source "$(dirname "$0")/lib.sh"
llama_bg
cuda_tests 150 tests/test_cpu_mailbox.py
peers_layout layout source source; peers_layout layout-q4 q4 q4; pack
wait $CONV; wait $BUILD; grep -E "built|rc=" $OUT/build.log | tail -3; echo "build done $(el)"; sync; pack
