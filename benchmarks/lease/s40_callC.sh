#!/usr/bin/env bash
# Session 40, call C (session 39 planned it as s39_callA.sh, which it replaces): the box's CPU through
# bench_cpu_native.py at 16 threads against llama.cpp's CPU-only build in the same call: the q4 path in both activation modes (session 39's integer
# q4 x q8 tiles with --cpu-act q8), the bf16 path (session 40's dense-row prefetch), on the 2-layer 10.6B-width
# model. CUDA_VISIBLE_DEVICES is empty for both engines. Carry [".whl", ".carry"].
source "$(dirname "$0")/lib.sh"
LLAMA_CUDA=OFF JOBS=16 bash tools/build_llamacpp.sh .carry/llama.cpp /root/lbcpu > $OUT/build-cpu.log 2>&1
echo "llama.cpp CPU build rc=$? $(el)"; tail -2 $OUT/build-cpu.log; pack
CUDA_VISIBLE_DEVICES= timeout 330 python3 benchmarks/bench_cpu_native.py --work /root/cn --llama-bin /root/lbcpu/bin \
  --llama-dir .carry/llama.cpp --threads 16 --out $OUT/cpu-native-box.json > $OUT/cpu-native-box.log 2>&1
echo "cpu-native rc=$? $(el)"; grep -v '^{' $OUT/cpu-native-box.log | tail -24; pack
