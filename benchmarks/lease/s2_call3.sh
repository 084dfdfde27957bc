#!/usr/bin/env bash
# Lease call 3: the families check (bf16 against transformers, Qwen3.5 32k prefill), then the 397B emulation: slices
# written straight to disk and measured (bench_397b.py write,slice; runs are saved one by one, call 4 resumes). The
# peers model is deleted first: the disk holds one of the two.
set -u
export PYTHONUNBUFFERED=1
BACK=$OUT; R=/root/res_$(basename "$0" .sh); mkdir -p $R; export OUT=$R
pack() { tar czf $BACK/$(basename "$0" .sh).tgz -C $R . 2>/dev/null; }  # after each step: a kill keeps the last
trap pack EXIT
rm -rf /root/peers /root/.cache/tiered; df -h /root | tail -1
PYTHONPATH=/tmp/site timeout 240 python3 benchmarks/bench_families_gpu.py --work /root/fam > $OUT/families.log 2>&1
echo "families rc=$?"; grep -v '^{' $OUT/families.log | tail -25; rm -rf /root/fam
pack
PYTHONPATH=/tmp/site:$PWD timeout 330 python3 benchmarks/bench_397b.py --phases write,slice --layers 8 --layers-b 4 --work /root/b397 \
  --text .carry/shared/text/eval --no-progress > $OUT/b397.log 2>&1; echo "397b rc=$?"; grep -v '^{' $OUT/b397.log | tail -40
