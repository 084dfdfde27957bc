#!/usr/bin/env bash
# Session 51, call C: the replayed step's timeline at HEAD (the fold removed) on the card of calls A and B, q4+q4 and
# bf16 (tools/profile_kernels.py --timeline, 16 tokens): the kernels' "adds" a token, for the VRAM ratio's ceiling
# (notes/Q4_DECODE.md, session 51).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
timelines q4 bf16
