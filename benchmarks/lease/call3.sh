#!/usr/bin/env bash
# Lease call 3: tiered on the peers model (bf16, q4 experts+dense, q4 experts) in VRAM and at --vram-gb 4, the
# report against llama.cpp; batched decode on a second GPU meanwhile.
set -u
export PYTHONUNBUFFERED=1
NG=$(nvidia-smi -L | wc -l)
if [ "$NG" -gt 1 ]; then
  (CUDA_VISIBLE_DEVICES=1 timeout 570 python3 benchmarks/bench_batch_gpu.py --layout /root/peers/layout \
     --llama-json /root/peers/llama.json --work /root/bb --text .carry/shared/text --phases vram,offload \
     > $OUT/batch.log 2>&1; echo "rc=$?" >> $OUT/batch.log) &
fi
export CUDA_VISIBLE_DEVICES=0
python3 benchmarks/bench_peers.py --phase tiered > $OUT/tiered.log 2>&1; echo "tiered rc=$?"; tail -4 $OUT/tiered.log
for v in q4 q4e; do
  python3 benchmarks/bench_peers.py --phase tiered --variant $v >> $OUT/tiered.log 2>&1; echo "tiered $v rc=$?"
done
python3 benchmarks/bench_peers.py --phase report --results-dir $OUT > $OUT/report.log 2>&1; echo "report rc=$?"; tail -30 $OUT/report.log
wait
tail -30 $OUT/batch.log 2>/dev/null
