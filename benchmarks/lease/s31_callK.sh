#!/usr/bin/env bash
# Session 31, call K (cold box, the last device seconds): the prefill clock fixed (engine.generate synchronises after
# the prefill: it measured the host's enqueue, so a replayed prefill read millions of tok/s in call J and eager ones
# ran ahead of their GPU work). bf16 gpt-oss, kernels only: the 512-token prefill replayed from its graph against the
# same engine's eager prefill, both on the synchronised clock.
source "$(dirname "$0")/lib.sh"
timeout 100 python3 benchmarks/bench_gpt_oss_gpu.py --work /root/bgo --experts source --tiles "" --repeats 3 \
  --new 8 --no-torch > $OUT/gptoss.log 2>&1
echo "gptoss rc=$? $(el)"; grep -v '^{' $OUT/gptoss.log | grep -v "attention sinks" | tail -6; pack
