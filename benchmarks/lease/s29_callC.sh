#!/usr/bin/env bash
# Session 29, call C (cold box, no layouts): the sampler alone (bench_sampling.py, the uniforms kernel fixed), the
# CUDA sampling tests, then where a sampled batch step's time goes (s29_sched_profile.py, the embedded model).
source "$(dirname "$0")/lib.sh"
timeout 150 python3 benchmarks/bench_sampling.py > $OUT/sampling.log 2>&1; echo "sampling rc=$? $(el)"
grep -E "^R=|FAILED|Error" $OUT/sampling.log; pack
timeout 120 python3 benchmarks/lease/s29_sched_profile.py > $OUT/sched.log 2>&1; echo "sched rc=$? $(el)"
grep -E "^B=" $OUT/sched.log; grep -A34 "Self CPU %" $OUT/sched.log | head -36 | cut -c1-160; pack
cuda_tests 150 tests/test_sampling.py -k "cuda"
