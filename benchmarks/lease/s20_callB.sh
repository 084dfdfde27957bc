#!/usr/bin/env bash
# Session 20, call B (cold box): the fill's copy shape. Call A's timeline: a fixed 6's filling steps take 425-435 us
# against 404 once the fill is dry (mean 455 with the misses' spikes), and 16 copy programs instead of 32 made the
# filling steps slower (471), not faster. If the copy's programs cost the compute kernels a program slot on their SMs
# (one-wave q4 kernels sized to the register file), a thinner copy (fewer warps, shorter loads) or a fatter one on
# fewer SMs should shorten the filling steps. Each shape (TIERED_FILL_GATHER warps:block:chunks, N:C for programs)
# times lru+fill6 with the timeline; then the best candidates without it, and the warm step profiled.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
for v in "base,,32" "w1b256,1:256:4,64" "w1b512,1:512:4,32" "w2b512,2:512:4,32" "w8b1024,8:1024:4,16" \
         "w16b1024,16:1024:4,8" "w1b256x132,1:256:4,132"; do
  IFS=, read tag shape ctas <<< "$v"
  TIERED_FILL_GATHER=$shape TIMEOUT=80 LAYOUT=layout-q4 offload_variant "tl-$tag" "lru+fill6:$ctas/device" \
    --device-fill 6:$ctas --timeline "lru+fill6:$ctas/device" > /dev/null
  echo "shape $tag ($shape, $ctas programs) $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-tl-$tag.json
done
TIMEOUT=120 LAYOUT=layout-q4 offload_variant prof "lru+fill6/device" --device-fill 6 --profile "lru+fill6/device" \
  > /dev/null
python3 - "$OUT/offload-layout-q4-prof.json" <<'PY'
import json, sys
d = json.loads(open(sys.argv[1]).read())
p = d["docs"][0]["runs"]["lru+fill6/device"].get("profile") or {}
for ph in ("timed", "timed_idle", "profiled"):
    q = p.get(ph) or {}
    print(ph, {k: q.get(k) for k in ("wall_us_per_token", "hits", "misses", "fill_active_after", "kernels_per_token",
                                     "kernel_us_per_token")})
for t in (p.get("profiled") or {}).get("top", [])[:30]:
    print("  ", round(t["us_per_token"], 1), t["per_token"], t["kernel"][:90])
PY
pack
