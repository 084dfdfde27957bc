#!/usr/bin/env bash
# Session 8, lease call C (the final commit's GPU checks and the offload figures): checkpoint and both repacks with
# the CUDA tests of this session's kernels beside them (PDL on: the default); then the slot-table kernels (before /
# after), the q4 VRAM decode with and without the dense GEMV's L2 prefetch (TIERED_PDL_PREFETCH), and issue 13's
# offload figures at --vram-gb 4 with replayed routing: q4 demand (lru/device) and history prefetch of 16 a layer
# (lru+pf16/device), bf16 lru/device and nextuse/device.
source "$(dirname "$0")/lib.sh"
CUDA_TESTS="tests/test_pdl.py tests/test_devtable.py tests/test_moe_kernels.py tests/test_quant_kernels.py
 tests/test_cache.py tests/test_fused_glue.py tests/test_attention_decode.py"
(timeout 300 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short $CUDA_TESTS > $OUT/cuda-tests.log 2>&1
 echo "rc=$?" >> $OUT/cuda-tests.log) &
TESTS=$!
peers_ckpt
peers_layout layout source source
peers_layout layout-q4 q4 q4
wait $TESTS; grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -14; echo "tests done $(el)"
pack
timeout 45 python3 benchmarks/bench_slot_table.py --old .carry/old/slot_table_9ba170a.py > $OUT/slot-table.log 2>&1
echo "slot-table rc=$? $(el)"; pack
for pf in 1 0; do peers_vram q4 l2pf$pf TIERED_PDL_PREFETCH=$pf; done
peers_offload layout-q4 "lru/device,lru+pf16/device" --device-prefetch 16
peers_offload layout "lru/device,nextuse/device"
