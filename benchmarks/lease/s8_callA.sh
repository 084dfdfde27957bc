#!/usr/bin/env bash
# Session 8, lease call A: programmatic dependent launch (kernels/pdl.py), the slot table's all-hit fast path and the
# two small torch kernels per layer moved into the expert kernels (slot_base, round_to). Checkpoint (qwen3-10b-8l,
# seed 0), bf16 and q4+q4 repacks; the slot-table kernels alone, before (the saved 9ba170a copy) and after; tiered's
# VRAM decode of q4 and bf16 with PDL on and off (TIERED_PDL), one after the other; the offload figures of issue 13
# (bench_cpu_experts_gpu.py at --vram-gb 4, replayed routing, device steps) on both layouts; the q4 step's profile.
source "$(dirname "$0")/lib.sh"
peers_ckpt
peers_layout layout source source
peers_layout layout-q4 q4 q4
timeout 60 python3 benchmarks/bench_slot_table.py --old .carry/old/slot_table_9ba170a.py > $OUT/slot-table.log 2>&1
echo "slot-table rc=$? $(el)"; grep -v '^{' $OUT/slot-table.log | tail -40; pack
for pdl in 1 0; do
  for v in q4 bf16; do peers_vram $v pdl$pdl TIERED_PDL=$pdl; done
done
for v in layout-q4 layout; do peers_offload $v "lru/device,nextuse/device"; done
timeout 60 python3 tools/profile_kernels.py -m $W/layout-q4 --glue on --tokens 16 > $OUT/profile-q4.log 2>&1
echo "profile rc=$? $(el)"; grep -v '^{' $OUT/profile-q4.log | head -30; pack
