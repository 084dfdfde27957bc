#!/usr/bin/env bash
# Lease call 1 (H200 box, 2 GPUs if lent): build llama.cpp, make the 8-layer model and every layout; CUDA tests
# on the second GPU meanwhile. State under /root/peers (kept while the box stays warm).
set -u
export PYTHONUNBUFFERED=1
NG=$(nvidia-smi -L | wc -l); echo "GPUs: $NG"; nvidia-smi -L
TG=$(( NG > 1 ? 1 : 0 ))
if [ "$NG" -gt 1 ]; then
  (CUDA_VISIBLE_DEVICES=$TG timeout 560 python3 -m pytest -v --tb=short -m cuda -p no:cacheprovider \
      --continue-on-collection-errors tests > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log) &
fi
JOBS=$(( $(nproc) > 20 ? $(nproc) - 6 : $(nproc) )) bash tools/build_llamacpp.sh > $OUT/build.log 2>&1; echo "build rc=$?"; tail -2 $OUT/build.log
export CUDA_VISIBLE_DEVICES=0
python3 benchmarks/bench_peers.py --phase model > $OUT/model.log 2>&1; echo "model rc=$?"; tail -4 $OUT/model.log
# the bf16 layout as the OLD tree (208579b) writes it: every tree of bench_trees_gpu.py reads it
PYTHONPATH=.carry/old python3 -m tiered repack /root/peers/ckpt /root/peers/layout-old --force > $OUT/repack-old.log 2>&1
echo "old repack rc=$?"
for v in "q4 q4 q4" "q4e q4 source"; do set -- $v
  python3 -c "import sys,json; from tiered.layout.repack import repack; print(json.dumps(repack('/root/peers/ckpt', '/root/peers/layout-$1', experts='$2', dense='$3', force=True, progress=False, quant_device='cuda')))" > $OUT/repack-$1.log 2>&1
  echo "repack $1 rc=$?"; tail -c 300 $OUT/repack-$1.log; echo
done
df -h /root | tail -1
wait
tail -5 $OUT/cuda-tests.log 2>/dev/null
