#!/usr/bin/env bash
# Session 35, call A: the grouped prefill kernels under the reference model's routing (bench_quant_kernels
# --routing replay, written in session 34, first GPU run) against uniform routing, q4 and bf16 at the 10.6B and
# 397B shapes; then why q4's grouped kernels lose to bf16's at many rows an expert (Nsight Compute of one layer at
# 2,048 tokens, tools/ncu_grouped_prefill.py); the CUDA test of repack on the GPU (session 34's _PartsKept mend).
source "$(dirname "$0")/lib.sh"
cuda_tests 100 "tests/test_quant_layout.py::test_cuda_repack_quantizes_on_the_gpu_like_the_cpu"
timeout 170 python3 benchmarks/bench_quant_kernels.py --phase prefill --routing replay --text .carry/shared/text/fit \
  --shapes 10.6B,397B --prefill-formats q4 --tokens 512,2048 --many-sweep --no-gemlite --max-seconds 150 \
  > $OUT/replay.log 2>&1
echo "replay rc=$? $(el)"; cp $OUT/quant_prefill.json $OUT/replay.json 2>/dev/null; pack
grep -E "auto|swap5" $OUT/replay.log | cut -c1-130 | head -30
timeout 80 python3 benchmarks/bench_quant_kernels.py --phase prefill --shapes 10.6B,397B --prefill-formats q4 \
  --tokens 512,2048 --no-gemlite --max-seconds 70 > $OUT/uniform.log 2>&1
echo "uniform rc=$? $(el)"; cp $OUT/quant_prefill.json $OUT/uniform.json 2>/dev/null; pack
grep -E "auto" $OUT/uniform.log | cut -c1-130
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
if [ -n "$NCU" ]; then
  timeout 150 $NCU --clock-control none --kernel-name regex:'grouped' --launch-skip 4 --launch-count 4 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy \
    --section InstructionStats --section LaunchStats --section MemoryWorkloadAnalysis --section SchedulerStats \
    python3 tools/ncu_grouped_prefill.py --formats bf16,q4 --tokens 2048 --reps 4 > $OUT/ncu.txt 2>&1
  echo "ncu rc=$? $(el)"; pack
  grep -E "^  [a-z_]+.*grouped|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occ|No Eligible|Issued Warp|Stall|Executed Ipc" $OUT/ncu.txt | cut -c1-120 | head -80
fi
