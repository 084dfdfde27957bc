#!/usr/bin/env bash
# Session 52, call D: call C cut to what about 300 s of device time holds (eleven refused starts left less): the
# peers checkpoint and its q4+q4 and bf16 layouts; the Gluon q4 GEMV against TUNED's word tile at the lm_head on
# this card (never timed on an H200); tiered's VRAM decode q4+q4 and bf16, and q4+q4 with the probe's fastest
# lm_head entry when it beat TUNED's PDL launch by 3% or more, alternating while time is left.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
gluon_lm 90
peers_vram q4 a
[ -n "$GL" ] && peers_vram q4 g "TIERED_QCONFIG=$GL"
peers_vram bf16 a
[ $(( $(date +%s) - T0 )) -lt 280 ] && peers_vram q4 b
[ -n "$GL" ] && [ $(( $(date +%s) - T0 )) -lt 300 ] && peers_vram q4 g2 "TIERED_QCONFIG=$GL"
decode_table
true
