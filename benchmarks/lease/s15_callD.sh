#!/usr/bin/env bash
# Session 15, call D: ncu (call C) showed the q4 decode kernels one wave each, register-limited (gate_up 80, down 120,
# lm_head 126 registers a thread: 25-31% occupancy) and waiting on memory (47-65% of cycles without an eligible
# warp). Here the default tiles of the 10.6B shape under register caps (QConfig.regs, ptxas maxnreg): the experts
# (gate_up, down) and the dense GEMVs (lm_head, qkv, o_proj), each checked against the reference first.
source "$(dirname "$0")/lib.sh"
timeout 175 python3 benchmarks/bench_quant_kernels.py --formats q4 --quick --regs 56,64,80,96 --shapes 10.6B \
  --max-seconds 160 > $OUT/qk-regs.log 2>&1; echo "qk rc=$? $(el)"
grep -E "^experts|^parts|^dense|QConfig" $OUT/qk-regs.log | tail -40
pack
