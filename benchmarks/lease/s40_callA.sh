#!/usr/bin/env bash
# Session 40, call A: issue 12's demand run on the box with session 40's two changes, each alone and together:
# the dense-row prefetch into L2 in the CPU kernel (PFD, 8 rows; TIERED_CPU_DEFINES=PFD=0 is session 39's kernel) and
# the cost model's admission penalty (a CPU-computed miss charged 0.25 of a copy; TIERED_ADMIT_PENALTY=0 is the old
# finish-first table). First tools/bench_cpu_experts.py's one-token rate of 8 bf16 experts of the 10.6B shape at 15
# threads, the builds alternating (PFD 0 / 8 / 16); then bf16 at --vram-gb 4, replayed routing, the defaults (device
# slot table, --cpu-experts auto), one fresh process per variant while the call's time lasts.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout source source; pack
timeout 60 python3 tools/bench_cpu_experts.py --threads 15 --paths bf16 --pool-gb 4 --repeats 8 --rounds 3 \
  --variant pfd0=PFD=0 --variant pfd8= --variant pfd16=PFD=16 > $OUT/cpu-experts-pfd.log 2>&1
echo "cpu experts rc=$? $(el)"; grep threads $OUT/cpu-experts-pfd.log; pack
for v in new old pfd-only pen-only; do
  [ $(( $(date +%s) - T0 )) -lt 340 ] || break
  d=""; p=""
  case $v in old) d=PFD=0; p=0;; pfd-only) p=0;; pen-only) d=PFD=0;; esac
  TIERED_CPU_DEFINES=$d TIERED_ADMIT_PENALTY=$p TIMEOUT=110 offload_variant $v "default" > /dev/null
  echo "$v $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-bf16-$v.json; pack

done
