#!/usr/bin/env bash
# Session 31, call G (cold box): the grouped expert kernels' tiles at gpt-oss-20b's expert shape (D = F = 2880, top-4
# of 32), prefill of 512 and 2048 tokens, bf16 / mxfp4 / q4 (bench_quant_kernels.py --phase prefill with the tile and
# swap sweeps): mxfp4's prefill ran at 0.064 of its bound in call A against q4's 0.083 and bf16's 0.22.
source "$(dirname "$0")/lib.sh"
timeout 480 python3 benchmarks/bench_quant_kernels.py --phase prefill --shapes gpt-oss --prefill-formats mxfp4,q4 \
  --tokens 512,2048 --prefill-sweep --swap-sweep --no-gemlite --max-seconds 420 > $OUT/sweep.log 2>&1
echo "sweep rc=$? $(el)"; grep -E "auto|torch" $OUT/sweep.log | head -20; pack
python3 - <<'PY'
import re
best = {}
for line in open("/root/res_s31_callG/sweep.log"):
    m = re.match(r"(\S+)\s+(\d+)\s+(\S+)\s+triton grouped\s+([\d.]+)\s.*?\s{2}(.+)$", line.strip())
    if m:
        k = (m[2], m[3])
        if k not in best or float(m[4]) < best[k][0]:
            best[k] = (float(m[4]), m[5])
for k, v in sorted(best.items()):
    print("best", k, v)
PY
