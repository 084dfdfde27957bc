#!/usr/bin/env bash
# Session 36, call A: the CUDA tests of the grouped kernels (session 35's refactors after its last call: _scale_pair,
# _pair / _one, _qdot's wrapper dropped), then where the VRAM decode step's time goes now (tools/profile_kernels.py,
# glue on, q4+q4 and bf16 of the 8-layer 10.6B shape): the per-kernel table the launch fusions of this session start
# from.
source "$(dirname "$0")/lib.sh"
cuda_tests 170 tests/test_quant_grouped.py
peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
for v in layout-q4 layout; do
  timeout 110 python3 tools/profile_kernels.py -m $W/$v --glue on --tokens 16 > $OUT/profile-$v.log 2>&1
  echo "profile $v rc=$? $(el)"; grep -v '^{' $OUT/profile-$v.log | grep -vE "^\[profile" | head -32; pack
done
