#!/usr/bin/env bash
# Session 17, call C1 (cold box; C2 follows on the warm box): llama.cpp builds in the background (llama-bench,
# llama-quantize) with the bf16 GGUF of the peers checkpoint, while the box makes the q4+q4 and bf16 layouts at the
# commit whose TUNED holds the session's o_proj and lm_head tiles.
source "$(dirname "$0")/lib.sh"
llama_bg
peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
wait $CONV; wait $BUILD; grep -E "built|rc=" $OUT/build.log | tail -3; echo "build done $(el)"; sync; pack
