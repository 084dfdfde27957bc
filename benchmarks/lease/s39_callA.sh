#!/usr/bin/env bash
# Session 39, call A (planned; session 39 had no device): the box's CPU (AMD EPYC, Zen 4 with AVX512-VNNI and
# AVX512-BF16, 16 cores) through bench_cpu_native.py with llama.cpp's CPU-only build in the same call: session 39's
# integer q4 x q8 GEMM tiles (`--cpu-act q8`: prompts, batch steps) and the float mode, at 16 threads, against
# llama-bench / llama-batched-bench on the same 2-layer 10.6B-width model (the VM's figures are 2 threads:
# cpu-native-2026-12-05-s39*.json). CUDA_VISIBLE_DEVICES is empty for both engines, so neither offloads a product
# to the GPU. Carry [".whl", ".carry"] (.carry/llama.cpp from tools/fetch_llamacpp.sh).
source "$(dirname "$0")/lib.sh"
LLAMA_CUDA=OFF JOBS=16 bash tools/build_llamacpp.sh .carry/llama.cpp /root/lbcpu > $OUT/build-cpu.log 2>&1
echo "llama.cpp CPU build rc=$? $(el)"; tail -2 $OUT/build-cpu.log; pack
CUDA_VISIBLE_DEVICES= timeout 420 python3 benchmarks/bench_cpu_native.py --work /root/cn --llama-bin /root/lbcpu/bin \
  --llama-dir .carry/llama.cpp --threads 16 --out $OUT/cpu-native-box.json > $OUT/cpu-native-box.log 2>&1
echo "cpu-native rc=$? $(el)"; grep -v '^{' $OUT/cpu-native-box.log | tail -20; pack
