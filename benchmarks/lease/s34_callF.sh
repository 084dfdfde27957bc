#!/usr/bin/env bash
# Session 34, call F (the budget's last 300 s): where a 512-token prompt of the 10.6B shape spends its time, q4+q4
# against bf16 (tools/profile_prefill.py: kernel table of one eager prefill under torch.profiler), then qlinear's
# paths at 32-96 rows (is the copy's 128-row threshold too high?).
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
for v in layout-q4 layout; do
  timeout 60 python3 tools/profile_prefill.py -m $W/$v --tokens 512 --top 14 --repeats 3 > $OUT/profile-$v.log 2>&1
  echo "profile $v rc=$? $(el)"; grep -v '^{' $OUT/profile-$v.log | tail -18 | cut -c1-130; pack
done
timeout 60 python3 benchmarks/bench_quant_kernels.py --phase prefill --shapes none --with-dense \
  --prefill-formats q4,q8 --tokens 32,64,96 --no-gemlite --max-seconds 50 > $OUT/dense.log 2>&1
echo "dense rc=$? $(el)"; pack
grep -E "qlinear|dequant kernel|cuBLAS F|quant_matmul " $OUT/dense.log | grep -v lm_head | sed 's/  */ /g' | cut -c1-70
