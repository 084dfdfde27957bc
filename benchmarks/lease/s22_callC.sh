#!/usr/bin/env bash
# Session 22, call C (cold box): with --device-fill copy the default, the CUDA tests of the files whose tests build an
# expert cache on the GPU (the device step, CPU experts, the engine, the run-ahead loop), then `tiered run` on the
# embedded model with a small budget; then bf16 at --vram-gb 4 (its table the prefill fills: nothing to plan), the
# default against session 19-21's default (CPU experts auto and the gather fill auto), one fresh process.
source "$(dirname "$0")/lib.sh"
cuda_tests 240 tests/test_devtable.py tests/test_cpu_experts.py tests/test_engine.py tests/test_ahead.py \
  tests/test_cache.py
timeout 120 python3 -m tiered run --device cuda --expert-slots 512 --ram-gb 0.05 --max-new-tokens 24 --json \
  "def fibonacci(n):" > $OUT/run.json 2> $OUT/run.err; echo "run rc=$? $(el)"
python3 -c "import json; d = json.loads(open('$OUT/run.err').read().strip().splitlines()[-1]); s = d.get('stats', d); print({k: s.get(k) for k in ('decode_graphs', 'decode_tok_s')}, (s.get('device_step') or {}).get('fill_copy'))" 2>&1 | tail -2
pack
peers_ckpt; peers_layout layout source source; pack
TIMEOUT=200 offload_variant bf16 "default,lru+cpu+fillauto/device" --device-fill auto > /dev/null
echo "bf16 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-bf16-bf16.json; pack
