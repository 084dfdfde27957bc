#!/usr/bin/env bash
# Session 30, call B (cold box): the offload goals at today's HEAD, one call. The CUDA test of gpt-oss batches (the
# paged kernel with sinks and windows, the batch graphs, the rows path) while the checkpoint and its layouts are made;
# then at --vram-gb 4 with replayed routing (127 tokens, fresh processes) bf16's default (issue 12: against the
# serial Belady bound) and q4+q4's default (issue 13: against the PCIe bound; q4/bf16 offload), and the VRAM decode
# of both (q4/bf16 in VRAM in the same call).
source "$(dirname "$0")/lib.sh"
(peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source) > $OUT/layouts.log 2>&1 &
LAY=$!
cuda_tests 150 tests/test_gpt_oss.py -k cuda
wait $LAY; cat $OUT/layouts.log; echo "layouts done $(el)"; pack
TIMEOUT=200 offload_variant bf16 "default" > /dev/null
echo "bf16 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-bf16-bf16.json; pack
TIMEOUT=150 LAYOUT=layout-q4 offload_variant q4 "default" > /dev/null
echo "q4 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-q4.json; pack
peers_vram q4 default
peers_vram bf16 default
