#!/usr/bin/env bash
# Lease call 2: llama.cpp's runs (bf16 and Q4_0 in VRAM, experts on the CPU, batched), tiered on the same model
# (bf16, q4 experts, q4 experts + dense) and the report; then the offload benchmark with CPU experts (replayed
# routing, --vram-gb 4, bf16, and the q4 layout's prefetch runs).
set -u
export PYTHONUNBUFFERED=1
# every file goes to R (JSON and logs), packed into one archive under the real $OUT when the script exits
BACK=$OUT; R=/root/res_$(basename "$0" .sh); mkdir -p $R; export OUT=$R
pack() { tar czf $BACK/$(basename "$0" .sh).tgz -C $R . 2>/dev/null; }  # after each step: a kill keeps the last
trap pack EXIT
timeout 200 python3 benchmarks/bench_peers.py --phase llama > $OUT/llama.log 2>&1; echo "llama rc=$?"; tail -12 $OUT/llama.log
pack
cp /root/peers/llama.json $OUT/ 2>/dev/null
timeout 110 python3 benchmarks/bench_peers.py --phase tiered > $OUT/tiered.log 2>&1; echo "tiered rc=$?"; tail -4 $OUT/tiered.log
pack
for v in q4 q4e; do
  timeout 90 python3 benchmarks/bench_peers.py --phase tiered --variant $v >> $OUT/tiered.log 2>&1; echo "tiered $v rc=$?"
pack
done
python3 benchmarks/bench_peers.py --phase report --results-dir $OUT > $OUT/report.log 2>&1; echo "report rc=$?"; tail -30 $OUT/report.log
pack
timeout 200 python3 benchmarks/bench_cpu_experts_gpu.py --layout /root/peers/layout --llama-json /root/peers/llama.json \
  --text .carry/shared/text --docs 2 > $OUT/cpu_experts.log 2>&1; echo "cpu experts rc=$?"; grep -v '^{' $OUT/cpu_experts.log | tail -32
pack
OUT=$R/q4e timeout 120 python3 benchmarks/bench_cpu_experts_gpu.py --layout /root/peers/layout-q4e --text .carry/shared/text --docs 2 \
  --only "predicted+4/off,predicted+4/auto" > $OUT/cpu_experts_q4e.log 2>&1; echo "q4e offload rc=$?"; grep -v '^{' $OUT/cpu_experts_q4e.log | tail -12
pack
