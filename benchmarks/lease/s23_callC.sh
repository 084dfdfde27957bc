#!/usr/bin/env bash
# Session 23, call C (cold box): the CUDA tests of the files whose tests build an expert cache or run the router glue
# on the GPU (the device step with the complete steps, the fused glue, the engine, the run-ahead loop, CPU experts;
# the nextuse test now with CPU experts off), then q4+q4 at --vram-gb 4, replayed routing, 127 tokens: the default
# with a profile of its device step (after the timed run the table is complete: the profile is the lookup-only
# step's), in one fresh process.
source "$(dirname "$0")/lib.sh"
cuda_tests 300 tests/test_devtable.py tests/test_fused_glue.py tests/test_engine.py tests/test_ahead.py \
  tests/test_cpu_experts.py
peers_ckpt; peers_layout layout-q4 q4 q4; pack
TIMEOUT=150 LAYOUT=layout-q4 offload_variant prof "default" --profile default > /dev/null
echo "prof $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-prof.json
python3 -c "
import json; d = json.loads(open('$OUT/offload-layout-q4-prof.json').read().strip().splitlines()[-1])
p = d['docs'][0]['runs']['default'].get('profile') or {}
print({k: v for k, v in p.items() if k != 'profiled'})
q = p.get('profiled') or {}; print({k: v for k, v in q.items() if k not in ('top',)}); print(q.get('top'))" 2>&1 | tail -8
pack
