#!/usr/bin/env bash
# Session 14, call C1 (C2 follows on the warm box): --cpu-experts now defaults to auto where the device slot table
# runs, dropped at load when the probe's table gives the CPU none of a layer's two misses. llama.cpp builds in the
# background (with the bf16 GGUF) while the GPU runs the mailbox's CUDA tests (the default's among them) and q4+q4 at
# --vram-gb 4 with every option at its default against explicit lru/device (off), in fresh processes.
source "$(dirname "$0")/lib.sh"
llama_bg
cuda_tests 150 tests/test_cpu_mailbox.py
peers_layout layout source source; peers_layout layout-q4 q4 q4; pack
LAYOUT=layout-q4 offload_variant default "default,lru/device"
LAYOUT=layout-q4 offload_variant default2 "lru/device,default"
wait $CONV; wait $BUILD; grep -E "built|rc=" $OUT/build.log | tail -3; echo "build done $(el)"; sync; pack
