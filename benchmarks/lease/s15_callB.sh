#!/usr/bin/env bash
# Session 15, call B (right after A, on the warm box: its checkpoint, layouts and sweep under /root): the fused
# tiles of A's sweep applied again (this call carries the local tree), then the VRAM decode of bf16 and of q4+q4
# with the fused kernel on and off, in alternation (one process each); then the q4+q4 offload at --vram-gb 4 with
# replayed routing (lru/device, the fill off and on) with the fused kernel on and off.
source "$(dirname "$0")/lib.sh"
[ -f /root/keep/quant_kernels.json ] && python3 tools/apply_tuned.py /root/keep/quant_kernels.json --fused | tail -2
peers_layouts
peers_vram bf16 b1
peers_vram q4 fused1b TIERED_QMOE_FUSED=1
peers_vram q4 fused0b TIERED_QMOE_FUSED=0
peers_vram bf16 b2
for f in 1 0; do export TIERED_QMOE_FUSED=$f; TIMEOUT=150 LAYOUT=layout-q4 offload_variant fused$f "lru/device,lru+fill8/device" --device-fill 8; done
