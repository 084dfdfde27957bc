#!/usr/bin/env bash
# Session 15, call C (after the fused MoE's revert): the CUDA tests of every file whose tests build an expert cache
# on the GPU (s14_callD's list: be3f2d2 and 723203b had not run on the GPU) and of the quantized kernels; then the
# q4 decode kernels under Nsight Compute (tools/ncu_quant_kernels.py: gate_up, down and the dense GEMVs at the
# 10.6B shape, PDL off), whose report says what holds each kernel back.
source "$(dirname "$0")/lib.sh"
cuda_tests 390 tests/test_cache.py tests/test_cpu_mailbox.py tests/test_devtable.py tests/test_cpu_experts.py \
  tests/test_miss_path.py tests/test_engine.py tests/test_ahead.py tests/test_segmented_decode.py \
  tests/test_batch_hybrid.py tests/test_scheduler.py tests/test_quant_kernels.py
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
timeout 170 $NCU --clock-control none --kernel-name regex:'_qgate_up|_qdown|_qgemv' --launch-skip 2 \
  --launch-count 18 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
  --section Occupancy --section LaunchStats --section SchedulerStats python3 tools/ncu_quant_kernels.py --reps 4 \
  > $OUT/ncu-quant-kernels.txt 2>&1; echo "ncu rc=$? $(el)"
grep -E "rel err|_q|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|No Eligible|Warp Cycles Per Issued" $OUT/ncu-quant-kernels.txt | head -120
pack
