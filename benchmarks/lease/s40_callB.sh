#!/usr/bin/env bash
# Session 40, call B (after call A on the warm box: its checkpoint and bf16 layout under /root/peers): the admission
# penalty on a laptop's link, issue 12's 12 GB/s goal: lru/device and lru+cpu/device paced to 12 GB/s with the
# defaults (penalty 0.25, PFD 8), then lru+cpu/device@12 with TIERED_ADMIT_PENALTY=0 in its own process; then the
# native link's default and session 39's behaviour (PFD=0, penalty 0) once more each, fresh processes.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout source source; pack
TIMEOUT=150 offload_variant paced12-new "lru/device@12,lru+cpu/device@12" --paced 12 > /dev/null
echo "paced12-new $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-bf16-paced12-new.json; pack
TIERED_ADMIT_PENALTY=0 TIMEOUT=120 offload_variant paced12-pen0 "lru+cpu/device@12" --paced 12 > /dev/null
echo "paced12-pen0 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-bf16-paced12-pen0.json; pack
for v in new2 old2; do
  [ $(( $(date +%s) - T0 )) -lt 470 ] || break
  d=""; p=""
  [ $v = old2 ] && { d=PFD=0; p=0; }
  TIERED_CPU_DEFINES=$d TIERED_ADMIT_PENALTY=$p TIMEOUT=110 offload_variant $v "default" > /dev/null
  echo "$v $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-bf16-$v.json; pack
done
