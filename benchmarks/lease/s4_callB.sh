#!/usr/bin/env bash
# Session 4, lease call B (right after A, on the warm box with /root/lb built): Qwen3.5-MoE of the 35B-A3B shape cut to
# 8 layers, decode in VRAM: tiered against transformers (with fla) and llama.cpp (bf16 GGUF of the same weights,
# llama-bench tg64 -ngl 99 -fa 1), alone on the GPU.
set -u
export PYTHONUNBUFFERED=1
BACK=$OUT; R=/root/res_$(basename "$0" .sh); mkdir -p $R; export OUT=$R
pack() { tar czf $BACK/$(basename "$0" .sh).tgz -C $R . 2>/dev/null; }
trap pack EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
rm -rf /root/fam
T0=$(date +%s)
timeout 500 python3 benchmarks/bench_qwen35_gpu.py --part decode --work /root/q35 --llama-bin /root/lb/bin > $OUT/qwen35-decode.log 2>&1; echo "qwen35 rc=$?"
grep -v '^{' $OUT/qwen35-decode.log | tail -30; cp /root/q35/*.log $OUT/ 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s"
