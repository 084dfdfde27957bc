#!/usr/bin/env bash
# Session 47, call G (the last of the budget): issue 13's VRAM ratio at HEAD on whatever card comes (an H200 was
# offered): q4+q4 and bf16 decode of the 8-layer 10.6B shape, then q4 with the step's ends as torch's ops.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
peers_vram q4 head
peers_vram bf16 head
peers_vram q4 torch TIERED_STEP_IO=torch
decode_table
