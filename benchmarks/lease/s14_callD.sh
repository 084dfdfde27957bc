#!/usr/bin/env bash
# Session 14, call D: the CUDA tests of every file whose tests build an expert cache on the GPU (with --cpu-experts
# unset, such a cache whose RAM tier holds every expert now resolves to auto with the device slot table), then
# `tiered run` on the embedded model with a small budget, its stderr showing the default's choice.
source "$(dirname "$0")/lib.sh"
cuda_tests 400 tests/test_cache.py tests/test_cpu_mailbox.py tests/test_devtable.py tests/test_cpu_experts.py \
  tests/test_miss_path.py tests/test_engine.py tests/test_ahead.py tests/test_segmented_decode.py \
  tests/test_batch_hybrid.py tests/test_scheduler.py
timeout 120 python3 -m tiered run --device cuda --expert-slots 16 --ram-gb 0.05 --max-new-tokens 24 --json \
  "def fibonacci(n):" > $OUT/run.json 2> $OUT/run.err; echo "run rc=$? $(el)"; grep -i "cpu-experts\|slot table" $OUT/run.err
python3 -c "import json; d = json.loads(open('$OUT/run.err').read().strip().splitlines()[-1]); s = d.get('stats', d); print({k: s.get(k) for k in ('decode_graphs', 'cpu_experts')})" 2>&1 | tail -2
pack
# (run's --json stats are the last line of stderr, CONTRACTS; at b8e231e this line read stdout and failed: the stats are in run.err)
