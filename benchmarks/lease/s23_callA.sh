#!/usr/bin/env bash
# Session 23, call A (cold box): the complete table. Once the copy fill has landed a plan of every key not resident
# (a budget that holds every MoE key; plan_fill keeps no free slot then), the steps replay lookup-only graphs: no
# resolve, gather or CPU hand-off; the router's softmax-top-k launch writes the slots (real routing) or one lookup
# reads a replayed routing's rows. First the tests on the GPU (the lookup kernels on CUDA against the reference, the
# captured step with the copy fill over two phases, replayed routing, the sm_90 compiles), `tiered run` with a
# 512-slot budget on the embedded model; then q4+q4 at --vram-gb 4 (1,024 slots: every expert), replayed routing,
# 127 tokens: the default and the default on a tuned layout, with the complete steps (on1) and without
# (TIERED_COMPLETE_STEP=0, off1), fresh processes.
source "$(dirname "$0")/lib.sh"
timeout 240 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_devtable.py tests/test_fused_glue.py \
  -k "cuda or lookup or complete or copy or sm90 or compile" > $OUT/cuda-tests.log 2>&1
echo "rc=$?" >> $OUT/cuda-tests.log; grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -14
echo "tests $(el)"; pack
timeout 120 python3 -m tiered run --device cuda --expert-slots 512 --ram-gb 0.05 --max-new-tokens 48 --json \
  "def fibonacci(n):" > $OUT/run.json 2> $OUT/run.err; echo "run rc=$? $(el)"
python3 -c "
import json; d = json.loads(open('$OUT/run.err').read().strip().splitlines()[-1]); s = d.get('stats', d)
ds = s.get('device_step') or {}; print({k: s.get(k) for k in ('decode_graphs', 'decode_tok_s')}, ds.get('fill_copy'),
{k: ds.get(k) for k in ('steps', 'complete', 'complete_steps')})" 2>&1 | tail -3
pack
peers_ckpt; peers_layout layout-q4 q4 q4; pack
RUNS="default,default/tuned"
TIMEOUT=150 LAYOUT=layout-q4 offload_variant on1 "$RUNS" > /dev/null
echo "on1 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-on1.json; pack
TIERED_COMPLETE_STEP=0 TIMEOUT=150 LAYOUT=layout-q4 offload_variant off1 "$RUNS" > /dev/null
echo "off1 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-off1.json; pack
